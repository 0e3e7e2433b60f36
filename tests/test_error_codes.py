"""The one table of errors -> HTTP status, gRPC code, exit code (error_codes.py), and
those who read it. What each row looks like from outside: tests/blackbox/."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from cachemesh import errors as e
from cachemesh.client import ERRORS
from cachemesh.error_codes import OTHER, TABLE, codes_of
from cachemesh.serve.adapters.http_errors import status_of
from cachemesh.serve.adapters.v2_grpc import code_of


def test_every_row_names_a_real_grpc_code_and_rows_go_most_specific_first():
    for i, (cls, codes) in enumerate(TABLE):
        assert isinstance(grpc.StatusCode[codes.grpc], grpc.StatusCode)
        # A row below a class's ancestor would never be reached.
        assert not any(issubclass(cls, earlier) for earlier, _ in TABLE[:i]), cls


@pytest.mark.parametrize("exc", [e.ModelTooLargeError("m"), e.SourceNotFoundError("s"),
                                 e.AccessDeniedError("a"), e.ClusterUnavailableError("c"),
                                 e.RevisionConflictError("k", 1, 2), e.StoreError("s"),
                                 RuntimeError("not ours")])
def test_the_adapters_answer_with_the_row_of_the_table(exc: BaseException):
    codes = codes_of(exc)
    assert status_of(exc)[0] == codes.http
    assert code_of(exc) == grpc.StatusCode[codes.grpc]


def test_a_few_rows_as_users_see_them():
    assert codes_of(e.SourceNotFoundError("s")) == codes_of(e.NotFoundError("n"))
    assert (codes_of(e.AccessDeniedError("a")).http, codes_of(e.AccessDeniedError("a")).exit) \
        == (502, 6)  # the origin refused: the server's answer, the user's to fix
    assert codes_of(e.ModelTooLargeError("m")).exit == codes_of(e.CapacityError("c")).exit == 5
    assert codes_of(e.IntegrityError("i")) == codes_of(KeyError("k")) == OTHER


def test_the_clients_classes_are_those_the_table_gives_each_status():
    for status, cls in ERRORS.items():
        assert codes_of(cls.__new__(cls)).http == status, cls


def test_the_command_line_reads_the_table_without_grpc():
    code = ("import sys, cachemesh.cli, cachemesh.error_codes;"
            " print(sorted(m for m in ('grpc', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"

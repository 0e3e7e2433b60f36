"""Calling the mesh from Python: the control API (ControlClient) and the OpenAI API.

    CACHEMESH_URL=http://localhost:8008 CACHEMESH_API_TOKEN=... CACHEMESH_INFERENCE_TOKEN=... \
        python client.py
(after ``kubectl port-forward svc/cachemesh 8008:8008``; the tokens are in the chart's Secret)
"""

import os

from openai import OpenAI

from cachemesh.client import ControlClient

url = os.environ.get("CACHEMESH_URL", "http://localhost:8008")
with ControlClient(url, token=os.environ["CACHEMESH_API_TOKEN"]) as api:
    cache = api.get_datacache("qwen2.5-0.5b")
    print(cache["name"], cache["status"], cache["view"])
    model = api.get_model("qwen-chat")
    print(model["name"], model["state"], model["traffic"])

chat = OpenAI(base_url=f"{url}/v1", api_key=os.environ["CACHEMESH_INFERENCE_TOKEN"])
answer = chat.chat.completions.create(
    model="qwen-chat", max_tokens=32,
    messages=[{"role": "user", "content": "Say hello."}])
print(answer.choices[0].message.content)

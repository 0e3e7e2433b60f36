"""Local stand-ins for the origins (Hugging Face Hub, ModelScope), real HTTP on loopback."""

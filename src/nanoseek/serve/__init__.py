"""`nanoseek serve`: an OpenAI-compatible HTTP server (with DeepSeek's `reasoning_content`) and a chat page.

from nanoseek.serve import create_app, ServeConfig
app = create_app(engine, tokenizer, ServeConfig(model_name="my-model"), model=model)
"""

from nanoseek.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]

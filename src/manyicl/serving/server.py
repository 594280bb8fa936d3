"""``manyicl serve``: the arguments checked before any model work, then the model loaded once and served by
uvicorn. The registry folder (--state) is held with the run lock, so two servers never share one registry."""

from __future__ import annotations

import ipaddress
import socket
from contextlib import ExitStack
from pathlib import Path

from manyicl.errors import ManyICLError
from manyicl.serving.schemas import Limits


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: loopback only if every address it has is
        if host == "localhost":
            return True
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except socket.gaierror:
            raise ManyICLError(f"--host: cannot resolve {host!r}; give an address or a resolvable name") from None
        return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def read_api_key(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ManyICLError(f"{path}: cannot read the API key file ({e.strerror}); give a readable file") from None
    if len(key) < 16 or any(c.isspace() for c in key):
        raise ManyICLError(f"{path}: the API key must be one line of at least 16 characters without spaces")
    return key


def run_server(model_name: str, adapter: str | None, host: str, port: int, api_key_file: str | None, cache_mb: float,
               state: str | None, max_tokens: int, max_queue: int, max_body_mb: float, max_demonstrations: int,
               max_inputs: int, max_input_chars: int) -> None:
    import click

    from manyicl.models import check_adapter, context_length, for_inference, load_model, load_tokenizer
    from manyicl.runlock import run_lock

    api_key = read_api_key(api_key_file)
    if api_key is None and not is_loopback(host):
        raise ManyICLError(f"--host {host}: not a loopback address; serving beyond this machine needs "
                           "--api-key-file (clients then send 'Authorization: Bearer <key>')")
    if adapter:
        check_adapter(adapter)
    context = context_length(model_name)
    if context and max_tokens > context:
        raise ManyICLError(f"--max-tokens: {max_tokens} is over the model's context length ({context})")
    limits = Limits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_demonstrations=max_demonstrations,
                    max_input_chars=max_input_chars, max_inputs=max_inputs, max_queue=max_queue)
    with ExitStack() as stack:
        if state:
            stack.enter_context(run_lock(state))
        import uvicorn

        from manyicl.serving.app import ServeSettings, create_app
        from manyicl.serving.registry import Registry

        registry = Registry(Path(state) if state else None)
        tokenizer = load_tokenizer(model_name)
        model = for_inference(load_model(model_name, adapter=adapter)).eval()
        settings = ServeSettings(model=model_name + (f" + {adapter}" if adapter else ""), max_tokens=max_tokens,
                                 cache_bytes=int(cache_mb * 1024 * 1024), api_key=api_key, limits=limits)
        app = create_app(model, tokenizer, settings, registry)
        click.echo(f"serving {settings.model} on http://{host}:{port} (API at /docs"
                   f"{', key required' if api_key else ''}; registry: {state or 'in memory'})")
        uvicorn.run(app, host=host, port=port, log_level="warning")

"""`python -m vlm.serve key=value ...`: Hydra-style overrides of `ServeConfig`, e.g.

    python -m vlm.serve checkpoint=outputs/2026-01-01_00-00-00/checkpoint.pt port=8000 model_name=vlm
    python -m vlm.serve 'allow_hosts=[images.example.com]' max_batch_size=16

With no checkpoint the untrained tiny default is served, so the server always starts.
Set VLM_API_KEY to require `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import sys


def parse(argv: list[str]):
    from omegaconf import OmegaConf

    from vlm.serve.config import ServeConfig

    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"arguments must be key=value overrides, got {bad}")
    base = OmegaConf.structured(ServeConfig)
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    except Exception as e:  # unknown key or wrong type
        raise SystemExit(f"bad override: {e}") from e
    return ServeConfig(**OmegaConf.to_container(merged))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from vlm.serve.app import create_app

    cfg = parse(sys.argv[1:] if argv is None else argv)
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servehelpers import CAMVID_ROOT, MAX_BODY_BYTES, MAX_PIXELS, train_briefly  # noqa: E402

pytest.importorskip("starlette", reason="offseg serve needs the serve extra: pip install 'offseg[serve]'")
pytest.importorskip("uvicorn", reason="offseg serve needs the serve extra: pip install 'offseg[serve]'")
pytest.importorskip("httpx", reason="the service tests use httpx as their HTTP client")


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory) -> Path:
    return train_briefly(tmp_path_factory.mktemp("serve") / "offseg-t-scenes")


@pytest.fixture(scope="session")
def trained_model(serve_checkpoint):
    import offseg

    return offseg.create_model("offseg-t", checkpoint=serve_checkpoint).eval()


@pytest.fixture(scope="session")
def served(serve_checkpoint):
    from offseg.serve import load_served_model

    return load_served_model("offseg-t", checkpoint=serve_checkpoint)


@pytest.fixture
def camvid() -> Path:
    if not (CAMVID_ROOT / "test" / "images").is_dir():
        pytest.skip(f"real CamVid not available at {CAMVID_ROOT}")
    return CAMVID_ROOT


@pytest.fixture(scope="session")
def server_url(served) -> str:
    from servehelpers import running_server

    from offseg.serve import ServeSettings, create_app

    settings = ServeSettings(max_batch=8, queue=64, max_body_bytes=MAX_BODY_BYTES, max_pixels=MAX_PIXELS)
    with running_server(create_app(served, settings)) as url:
        yield url

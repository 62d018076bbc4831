"""The backend base class (runtime/backends/base.py): one input check in the public call, the subclass only
infers, and a lifecycle where closing twice is harmless and a call after close is a clear error.

A small in-memory subclass exercises the base class alone; one test repeats the lifecycle on a real onnxruntime
backend over an exported file.
"""

from __future__ import annotations

import pytest
import torch
from _runtime_models import shared_artifacts

from ddpm.errors import DDPMError, InvalidArgumentError
from ddpm.runtime.backends import Backend, BackendClosedError, open_backend
from ddpm.schedule import Schedule

META = {
    "format": "ddpm/1",
    "model": {"arch": "unet", "in_channels": 1, "image_size": 4},
    "schedule": Schedule.linear(10).config,
    "prediction": "eps",
    "sample_shape": [1, 4, 4],
    "dataset": "test",
    "step": 0,
}


class Doubler(Backend):
    """``2 * x``; counts calls into ``_infer`` and ``_release``."""

    name = "doubler"
    capturable = False

    def __init__(self) -> None:
        super().__init__(META, torch.device("cpu"), description="doubles x")
        self.inferred = 0
        self.released = 0

    def _infer(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.inferred += 1
        return 2 * x

    def _release(self) -> None:
        self.released += 1


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4)


def _t(n: int = 3) -> torch.Tensor:
    return torch.randint(0, 10, (n,))


def test_attributes_come_from_the_metadata_handed_in():
    b = Doubler()
    assert (b.name, b.capturable, b.device, b.stream) == ("doubler", False, torch.device("cpu"), None)
    assert b.meta is META and b.sample_shape == (1, 4, 4) and b.description == "doubles x"
    assert "doubler on cpu, open" in repr(b)


def test_valid_call_reaches_infer():
    b = Doubler()
    x = _x()
    assert torch.equal(b(x, _t()), 2 * x) and b.inferred == 1


@pytest.mark.parametrize(
    "x, t, match",
    [
        (torch.randn(3, 1, 8, 8), _t(), r"x must have shape \[N, 1, 4, 4\], got \[3, 1, 8, 8\]"),
        (torch.randn(16), _t(16), r"x must have shape \[N, 1, 4, 4\], got \[16\]"),
        (torch.randn(3, 1, 4, 4, dtype=torch.float64), _t(), "x must be float32, got torch.float64"),
        (torch.randn(3, 1, 4, 4).half(), _t(), "x must be float32, got torch.float16"),
        (_x(), _t(2), r"t must be int64 of shape \[3\], got torch.int64 \[2\]"),
        (_x(), _t().int(), r"t must be int64 of shape \[3\], got torch.int32 \[3\]"),
        (_x(), _t().view(3, 1), r"t must be int64 of shape \[3\], got torch.int64 \[3, 1\]"),
    ],
)
def test_bad_inputs_are_refused_before_infer(x, t, match):
    b = Doubler()
    with pytest.raises(InvalidArgumentError, match=match):
        b(x, t)
    assert b.inferred == 0


def test_inputs_on_another_device_are_refused():
    b = Doubler()
    b.device = torch.device("meta")  # a device the inputs are not on, available on every machine
    with pytest.raises(
        InvalidArgumentError, match="x and t must be on the backend's device meta, got cpu and cpu"
    ):
        b(_x(), _t())
    assert b.inferred == 0


def test_close_is_idempotent_and_releases_once():
    b = Doubler()
    b.close()
    b.close()
    assert b.closed and b.released == 1
    with b:  # a with-block on a closed backend closes nothing twice either
        pass
    assert b.released == 1 and "closed" in repr(b)


def test_with_block_closes_and_call_after_close_is_a_clear_error():
    with Doubler() as b:
        b(_x(), _t())
    assert b.closed and b.released == 1
    with pytest.raises(BackendClosedError, match="the doubler backend was closed; open the artifact again"):
        b(_x(), _t())
    assert b.inferred == 1
    assert issubclass(BackendClosedError, DDPMError)  # the CLI reports it as one line, exit 2


def test_close_on_error_inside_with_block():
    with pytest.raises(ZeroDivisionError):
        with Doubler() as b:
            1 / 0  # noqa: B018
    assert b.closed and b.released == 1


def test_subclass_must_implement_infer_and_release():
    class Half(Backend):
        name, capturable = "half", False

        def _infer(self, x, t):
            return x

    with pytest.raises(TypeError, match="_release"):
        Half(META, torch.device("cpu"), description="")


def test_onnxruntime_backend_lifecycle(tmp_path_factory):
    onnx_path = shared_artifacts(tmp_path_factory)["mlp"][1]
    backend = open_backend(onnx_path, device="cpu")
    x, t = torch.randn(2, 2), torch.tensor([0, 999])
    with backend:
        assert backend(x, t).shape == (2, 2)
    assert backend.closed and backend.session is None
    backend.close()
    with pytest.raises(BackendClosedError, match="the onnxruntime backend was closed"):
        backend(x, t)

"""C2C on CUDA: training resumes from its saved state (a GPU call cut short by its time limit goes on)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cachelm.c2c import pair
from cachelm.c2c.data import TrainExample
from cachelm.c2c.train import TrainConfig, train_fuser
from tests.unit.test_c2c_support import receiver_model, receiver_tokenizer, sharer_model, sharer_tokenizer

pytestmark = pytest.mark.gpu

EXAMPLES = [
    TrainExample(prompt=f"Question: what is {i} plus {i}?\nAnswer:", response=f"{2 * i}", source="t")
    for i in range(12)
]


class Stop(Exception):
    pass


def test_training_resumes_on_cuda(tmp_path: Path) -> None:
    """The saved state is loaded onto the GPU (`map_location`), RNG states included: they must be moved
    back to the CPU before they are restored (a resumed H100 run failed on exactly this)."""
    receiver = pair.from_objects("tiny-llama", receiver_model().cuda(), receiver_tokenizer())
    sharer = pair.from_objects("tiny-gemma3", sharer_model().cuda(), sharer_tokenizer())
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-2, save_every=3)

    def fresh(seed: int) -> Any:
        torch.manual_seed(1)
        fuser = pair.new_fuser(receiver, sharer, hidden_dim=8).cuda()
        torch.manual_seed(seed)
        return fuser

    full = fresh(5)
    train_fuser(pair.pipeline(receiver, sharer, full), EXAMPLES, cfg, progress=False)

    def stop_at_4(step: int, loss: float) -> None:
        if step == 4:
            raise Stop

    state = tmp_path / "state.pt"
    with pytest.raises(Stop):
        train_fuser(
            pair.pipeline(receiver, sharer, fresh(5)),
            EXAMPLES,
            cfg,
            state_path=state,
            progress=False,
            on_step=stop_at_4,
        )
    resumed = fresh(123)
    info = train_fuser(
        pair.pipeline(receiver, sharer, resumed), EXAMPLES, cfg, state_path=state, progress=False
    )
    assert info["steps"] == 6
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)

import torch

from flashdistill.train import EMA


def test_ema_update_and_copy_follow_the_formula():
    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)  # frozen weights are not tracked
    ema = EMA(lin, decay=0.9)
    assert set(ema.shadow) == {"weight"}
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin, step=100)  # warm-up bound (101/110) > 0.9, so decay is 0.9
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    ema.update(lin, step=0)  # warm-up: decay = 1/10
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * (0.9 * w0 + 0.1 * (w0 + 1.0)) + 0.9 * (w0 + 1.0))
    expected = ema.shadow["weight"].clone()
    ema.copy_to(lin)
    torch.testing.assert_close(lin.weight.detach(), expected)

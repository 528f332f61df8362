"""Sampling numbers (issue #28): temperatures too small to divide by, and logits that are not finite."""
import pytest
import torch

from dalle.model import DALLE, DALLEConfig
from dalle.sampling import GREEDY_BELOW, Sampler, sample_from_logits


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 5e-324, GREEDY_BELOW, 1e-30])
def test_tiny_temperatures_are_greedy_not_an_error(temperature):
    """1e-39 passed the argument check and then overflowed the logits (torch.multinomial raised); every positive
    temperature now samples, and one this small draws the likeliest token (no ties here)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30
    got = sample_from_logits(logits, temperature, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, logits.argmax(-1))
    with_top = sample_from_logits(logits, temperature, top_k=5, top_p=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(with_top, logits.argmax(-1))


def test_large_logits_at_a_small_temperature_do_not_overflow():
    """Logits near the float32 limit divided by a small temperature: shifted by the row maximum first."""
    logits = torch.tensor([[3e38, 2.9e38, -3e38], [-1.0, 0.0, 1.0]])
    got = sample_from_logits(logits, 1e-3, generator=torch.Generator().manual_seed(0))
    assert got.tolist() == [0, 2]


@pytest.mark.parametrize("temperature", [0.0, 1e-39, 1.0])
@pytest.mark.parametrize("bad", ["nan", "inf", "all_neg_inf"])
def test_non_finite_logits_are_an_error_naming_the_step(temperature, bad):
    """NaN logits at temperature 0 silently picked the NaN's index; every temperature now refuses them."""
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    if bad == "all_neg_inf":
        logits[1] = float("-inf")
    else:
        logits[1, 7] = float(bad)
    with pytest.raises(ValueError, match=r"^image token 4 of 16: row 1 of the logits holds"):
        sample_from_logits(logits, temperature, where="image token 4 of 16")
    logits[:, 0] = float("-inf")  # -inf in some entries of a row is a filtered token, not an error
    logits[1] = torch.randn(20).clamp(-3, 3)
    logits[1, 0] = float("-inf")
    assert sample_from_logits(logits, temperature).shape == (3,)


def test_the_sampler_names_the_image_token_whose_logits_are_nan():
    cfg = DALLEConfig.micro(attn_backend="torch")
    torch.manual_seed(0)
    m = DALLE(cfg).eval()
    with torch.no_grad():
        m.ln_f.bias.fill_(float("nan"))  # every image logit is NaN
    text = torch.randint(0, cfg.text_rows, (2, cfg.text_len))
    for temperature in (0.0, 1e-39, 1.0):
        with pytest.raises(ValueError, match=rf"^image token 0 of {cfg.image_len}: row 0 of the logits holds NaN"):
            Sampler(m).generate(text, temperature=temperature)

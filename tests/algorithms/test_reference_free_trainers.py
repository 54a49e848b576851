"""CPO, SimPO and ORPO on the packed core against TRL 1.16's math on unpacked sequences: the loss,
its gradient and the logged metrics; no reference model is built or run."""

import pytest
import torch
import torch.nn.functional as F

from fastalign.algorithms import reference_free
from fastalign.algorithms.cpo import CPOConfig, CPOTrainer, SimPOConfig, SimPOTrainer
from fastalign.algorithms.orpo import ORPOConfig, ORPOTrainer
from fastalign.data import tokenize_pairs
from fastalign.kernels.preference import log1mexp
from fastalign.models.tiny import char_tokenizer, tiny_model
from fastalign.tasks.sort_digits import make_preference_pairs

ROWS = make_preference_pairs(6, seed=3)


def build(trainer_class, config_class, tmp_path, **options):
    model = tiny_model("llama", hidden_size=32, layers=1, heads=2, seed=0)
    args = config_class(output_dir=str(tmp_path), max_tokens_per_batch=4096, disable_tqdm=True, **options)
    return trainer_class(model, args=args, train_dataset=ROWS, tokenizer=char_tokenizer())


def token_logps(model, ids):
    """log p of each token after the first, from an unpacked forward of one sequence."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def trl_terms(model, average: bool):
    """Per pair TRL's policy log-probs (completion sums or means) and the chosen sequences' NLL
    parts: ``(pi_c [P], pi_r [P], prompt NLL sum, completion NLL sum, prompt tokens, completion tokens)``."""
    pairs, _ = tokenize_pairs(ROWS, char_tokenizer(), max_length=1024, max_prompt_length=512)
    pis, nll = {"c": [], "r": []}, [0.0, 0.0, 0, 0]
    for p in pairs:
        for key, prompt, completion in (("c", p.chosen_prompt, p.chosen), ("r", p.rejected_prompt, p.rejected)):
            logp = token_logps(model, prompt + completion)
            part = logp[len(prompt) - 1:]  # the positions predicting completion tokens
            pis[key].append(part.mean() if average else part.sum())
            if key == "c":
                nll[0], nll[1] = nll[0] - logp[:len(prompt) - 1].sum(), nll[1] - part.sum()
                nll[2], nll[3] = nll[2] + len(prompt) - 1, nll[3] + len(completion)
    return (torch.stack(pis["c"]), torch.stack(pis["r"]), *nll)


def fastalign_loss(trainer):
    """The loss over the one micro-batch of the six pairs, as a mean over pairs, and the metrics."""
    assert len(trainer.train_batches) == 1
    batch = trainer.train_batches[0]
    loss_sum, sums = trainer.compute_loss(batch)
    n = batch.chosen.numel()
    return loss_sum / n, {k: float(v) / n for k, v in sums.items()}


def common_metrics(pi_c, pi_r, beta):
    c, r = beta * pi_c.detach(), beta * pi_r.detach()
    return {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/accuracies": (c > r).float().mean(),
            "rewards/margins": (c - r).mean(), "logps/chosen": pi_c.mean(), "logps/rejected": pi_r.mean()}


def assert_metrics(got, expected):
    assert set(expected) <= set(got), sorted(got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(torch.as_tensor(value).detach()), rel=1e-4, abs=1e-5), key


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradient(trainer, hand_loss):
    model = trainer.model
    model.zero_grad()
    fastalign_loss(trainer)[0].backward()
    ours = grads(model)
    model.zero_grad()
    hand_loss().backward()
    theirs = grads(model)
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("disable_prompt_loss", [False, True])
def test_orpo_matches_trl(tmp_path, disable_prompt_loss):
    beta = 0.25
    trainer = build(ORPOTrainer, ORPOConfig, tmp_path, beta=beta, disable_prompt_loss=disable_prompt_loss)

    def hand():
        pi_c, pi_r, nll_p, nll_c, n_p, n_c = trl_terms(trainer.model, average=True)
        # TRL 1.16: the chosen NLL over prompt and completion (ORPO's code), or the completion only.
        nll = nll_c / n_c if disable_prompt_loss else (nll_p + nll_c) / (n_p + n_c)
        log_odds = (pi_c - pi_r) - (log1mexp(pi_c) - log1mexp(pi_r))
        ratio = F.logsigmoid(log_odds)
        loss = nll - (beta * ratio).mean()
        return loss, nll, ratio, log_odds, pi_c, pi_r

    loss, metrics = fastalign_loss(trainer)
    expected, nll, ratio, log_odds, pi_c, pi_r = hand()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert_metrics(metrics, {**common_metrics(pi_c, pi_r, beta), "nll_loss": nll, "log_odds_ratio": ratio.mean(),
                             "log_odds_chosen": log_odds.mean()})
    assert_same_gradient(trainer, lambda: hand()[0])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_matches_trl(tmp_path, loss_type):
    beta, alpha, gamma, eps = 0.2, 0.7, 0.3, 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    trainer = build(CPOTrainer, CPOConfig, tmp_path, beta=beta, loss_type=loss_type, cpo_alpha=alpha,
                    simpo_gamma=gamma, label_smoothing=eps)

    def hand():
        # TRL 1.16's CPOTrainer.cpo_loss: means per token for ipo and simpo, sums otherwise; the NLL
        # over the chosen completions.
        pi_c, pi_r, _, nll_c, _, n_c = trl_terms(trainer.model, average=loss_type in ("ipo", "simpo"))
        h = pi_c - pi_r
        if loss_type == "simpo":
            h = h - gamma / beta
        if loss_type in ("sigmoid", "simpo"):
            losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * h)
        else:
            losses = (h - 1 / (2 * beta)) ** 2
        return losses.mean() + alpha * nll_c / n_c, nll_c / n_c, pi_c, pi_r

    loss, metrics = fastalign_loss(trainer)
    expected, nll, pi_c, pi_r = hand()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert_metrics(metrics, {**common_metrics(pi_c, pi_r, beta), "nll_loss": nll})
    assert_same_gradient(trainer, lambda: hand()[0])


def test_simpo_is_cpo_with_the_simpo_loss_and_no_nll(tmp_path):
    config = SimPOConfig(output_dir=str(tmp_path))
    assert (config.loss_type, config.cpo_alpha, config.beta, config.simpo_gamma) == ("simpo", 0.0, 2.0, 0.5)
    assert issubclass(SimPOTrainer, CPOTrainer)
    trainer = build(SimPOTrainer, SimPOConfig, tmp_path)
    cpo = build(CPOTrainer, CPOConfig, tmp_path / "cpo", loss_type="simpo", cpo_alpha=0.0, beta=2.0)
    assert float(fastalign_loss(trainer)[0].detach()) == pytest.approx(float(fastalign_loss(cpo)[0].detach()), rel=1e-6)


@pytest.mark.parametrize("trainer_class,config_class", [(CPOTrainer, CPOConfig), (SimPOTrainer, SimPOConfig),
                                                       (ORPOTrainer, ORPOConfig)])
def test_no_reference_is_built_or_run(tmp_path, monkeypatch, trainer_class, config_class):
    """One model, one body forward per micro-batch, and no reference run key."""
    built = []
    monkeypatch.setattr(torch.nn.Module, "__deepcopy__", lambda self, memo: built.append(self), raising=False)
    trainer = build(trainer_class, config_class, tmp_path)
    assert trainer.ref_model is None and built == []
    assert "ref_model_name_or_path" not in {k.name for k in trainer_class.run_keys}
    forwards = []
    real = reference_free.packed_hidden
    monkeypatch.setattr(reference_free, "packed_hidden", lambda model, batch: forwards.append(model) or real(model, batch))
    fastalign_loss(trainer)
    assert forwards == [trainer.model]


def test_an_encoder_decoder_model_is_refused(tmp_path):
    from fastalign.algorithms.kto import KTOConfig, KTOTrainer
    from fastalign.errors import ConfigError
    from helpers import tiny_t5

    for trainer_class, config_class in ((ORPOTrainer, ORPOConfig), (KTOTrainer, KTOConfig)):
        with pytest.raises(ConfigError, match="encoder-decoder model: CPO, SimPO, ORPO and KTO take decoder-only"):
            trainer_class(tiny_t5(), args=config_class(output_dir=str(tmp_path)), train_dataset=ROWS,
                          tokenizer=char_tokenizer())

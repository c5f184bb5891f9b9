"""``python -m diffusion sweep``: the grid, the claims' verdicts, and a tiny sweep end to end."""
import csv
import json
import os

import pytest

from diffusion import sweep
from diffusion.config import preset


def test_grid_full_and_quick(tmp_path):
    base = preset("digits")
    full = sweep.grid(base, str(tmp_path), quick=False, ft_epochs=7)
    names = [r["name"] for r in full]
    # baseline + its control, 2 λ × 2 blur × 2 p × 2 spaces × (scratch, fine-tune), recipe + blur-10
    assert len(full) == len(set(names)) == 3 + 32 + 2
    for i, r in enumerate(full):  # a fine-tune comes after its parent and starts from its checkpoint
        cfg = r["config"]
        assert cfg.out_dir == os.path.join(str(tmp_path), r["name"])
        assert not cfg.eval_final and cfg.eval_every == 0
        if r["after"]:
            assert r["after"] in names[:i]
            assert cfg.init_from == os.path.join(str(tmp_path), r["after"], "checkpoint.pt")
            assert cfg.epochs == 7
        else:
            assert cfg.init_from is None and cfg.epochs == base.epochs
    by = {r["name"]: r["config"] for r in full}
    assert by["baseline"].ot_lambda == 0 and by["baseline-ft"].ot_lambda == 0
    seed1 = by["baseline-seed1"]
    assert (seed1.seed, seed1.train_seed, seed1.ot_lambda) == (base.seed, base.seed + 1, 0)
    ot = by["ot-ft-feature-l0.25-b0.75-p1"]
    assert (ot.ot_lambda, ot.ot_blur, ot.ot_p, ot.ot_space) == (0.25, 0.75, 1, "feature")
    rec = by["recipe"]
    assert (rec.ot_lambda, rec.ot_blur, rec.ot_squash, rec.ot_space, rec.ot_pool_size, rec.ot_ref_batch) == \
        (0.001, 0.2, "tanh", "feature", 0, 2000)
    assert by["recipe-blur10"].ot_blur == 10 and by["recipe-blur10"].ot_squash == "tanh"
    quick = [r["name"] for r in sweep.grid(base, str(tmp_path), quick=True)]
    assert quick == ["baseline", "baseline-seed1", "baseline-ft", "ot-scratch-pixel-l0.1-b0.35-p2", "ot-scratch-pixel-l0.1-b0.75-p2",
                     "ot-scratch-pixel-l0.25-b0.35-p2", "ot-scratch-pixel-l0.25-b0.75-p2",
                     "ot-ft-pixel-l0.1-b0.35-p2", "recipe"]


def test_train_seed_changes_the_model_not_the_data(tiny_cfg):
    """``train_seed``: another initialisation and batch order on the same splits and feature nets."""
    import torch

    from diffusion.train import Trainer, feature_net_path

    a, b = Trainer(tiny_cfg), Trainer(tiny_cfg.replace(train_seed=tiny_cfg.seed + 1))
    assert torch.equal(a.data.x_train, b.data.x_train) and torch.equal(a.data.x_val, b.data.x_val)
    assert feature_net_path(a.cfg, 8, "eval") == feature_net_path(b.cfg, 8, "eval")
    pa, pb = (torch.cat([p.flatten() for p in t.model.parameters()]) for t in (a, b))
    assert not torch.equal(pa, pb)
    c = Trainer(tiny_cfg.replace(train_seed=tiny_cfg.seed))
    assert torch.equal(torch.cat([p.flatten() for p in c.model.parameters()]), pa)


def test_finished_runs_survive_new_config_fields(tiny_cfg):
    """A result saved before a config field existed still counts as the same run."""
    saved = json.loads(json.dumps(tiny_cfg.to_dict()))
    saved.pop("train_seed")
    assert sweep._same(saved, tiny_cfg)
    assert not sweep._same({**saved, "ot_lambda": 0.5}, tiny_cfg)
    assert not sweep._same({**saved, "removed_field": 1}, tiny_cfg)


def test_checkpoint_series(tiny_cfg):
    from diffusion.train import Trainer, load_model

    Trainer(tiny_cfg.replace(epochs=3, save_every=2)).train()
    out = tiny_cfg.out_dir
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == ["checkpoint.pt", "checkpoint_0002.pt"]
    model, _, cfg = load_model(os.path.join(out, "checkpoint_0002.pt"))
    assert cfg.save_every == 2


def _result(ot, fid, val, nn=3.0, p5=0.05, **guided):
    mem = {"nn_train_mean": nn, "below_train_p5": p5, "duplicate_frac": 0.0}
    samplers = {"plain": {"ot_train": ot, "fid_train": fid, "memorisation": mem}}
    for s, (o, f) in guided.items():
        samplers[s] = {"ot_train": o, "fid_train": f, "memorisation": mem}
    return {"val_loss": val, "train_time": 1.0, "samplers": samplers}


def test_claims_verdicts():
    res = {"baseline": _result(30.0, 10.0, 0.10, sgd=(25.0, 9.0), adam=(28.0, 9.5)),
           "ot-scratch-pixel-l0.1-b0.35-p2": _result(28.0, 9.0, 0.105, sgd=(14.0, 8.0), adam=(20.0, 8.5)),
           "ot-scratch-pixel-l0.25-b0.75-p2": _result(35.0, 12.0, 0.13, sgd=(30.0, 11.0), adam=(33.0, 11.0)),
           "recipe": _result(29.0, 10.5, 0.101, sgd=(24.0, 9.0), adam=(27.0, 9.0))}
    c = {x["claim"].split(" ")[0]: x for x in sweep.claims(res)}
    assert len(sweep.claims(res)) == 4
    first = next(x for x in sweep.claims(res) if x["claim"].startswith("OT(gen, train) reduced"))
    assert first["verdict"] == "reproduced" and "-53.3%" in first["ours"]  # 30 → 14
    recipe = next(x for x in sweep.claims(res) if "λ = 0.001" in x["claim"])
    assert recipe["verdict"] == "not reproduced"  # OT lower, FID higher
    val = c["validation"]
    assert val["verdict"] == "partly reproduced" and "2 of 3" in val["ours"]
    aggressive = next(x for x in sweep.claims(res) if "aggressive" in x["claim"])
    assert aggressive["verdict"] == "reproduced" and "1 of 1" in aggressive["ours"]
    # the improvement's novelty is reported beside it
    assert "NN dist" in first["novelty"] and "baseline" in first["novelty"]
    res["ot-scratch-pixel-l0.1-b0.35-p2"]["samplers"]["sgd"]["ot_train"] = 16.0  # 30 → 16: −46.7%
    first = next(x for x in sweep.claims(res) if x["claim"].startswith("OT(gen, train) reduced"))
    assert first["verdict"] == "not reproduced"
    # an effect smaller than what a second training seed changes does not count
    res["recipe"] = _result(28.0, 9.5, 0.101)  # OT −2.0, FID −0.5
    verdict = lambda: next(x for x in sweep.claims(res) if "λ = 0.001" in x["claim"])["verdict"]  # noqa: E731
    assert verdict() == "reproduced"
    res["baseline-seed1"] = _result(32.5, 10.2, 0.1)  # seed noise: OT 2.5, FID 0.2
    assert sweep.seed_noise(res, "ot_train") == pytest.approx(2.5)
    assert verdict() == "not reproduced"
    aggressive = next(x for x in sweep.claims(res) if "aggressive" in x["claim"])
    assert aggressive["verdict"] == "reproduced"  # 35 vs 28 and 12 vs 9: beyond the noise
    res["baseline-seed1"] = _result(38.0, 10.2, 0.1)  # OT noise 8 > 35 − 28
    aggressive = next(x for x in sweep.claims(res) if "aggressive" in x["claim"])
    assert aggressive["verdict"] == "not reproduced"


def test_cli_dry_run_and_bad_only(capsys):
    assert sweep.main(["--quick", "--dry-run", "--only", "ot-ft-pixel-l0.1-b0.35-p2"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert out[0].startswith("baseline") and out[1].startswith("ot-ft-pixel-l0.1-b0.35-p2 after baseline")
    with pytest.raises(ValueError, match="--only"):
        sweep.main(["--quick", "--dry-run", "--only", "nope"])


def test_tiny_sweep_end_to_end(tiny_cfg, tmp_path):
    """A baseline, an OT fine-tune of it and an OT run from scratch in two worker processes:
    results, the resume of a finished sweep (nothing retrained), and the report."""
    base = tiny_cfg.replace(epochs=1, threads=1)
    runs_dir = str(tmp_path / "runs")
    keep = ("baseline", "ot-ft-pixel-l0.1-b0.35-p2", "ot-scratch-pixel-l0.25-b0.75-p2")
    runs = [r for r in sweep.grid(base, runs_dir, quick=True, ft_epochs=1) if r["name"] in keep]
    assert [r["name"] for r in runs] == ["baseline", "ot-scratch-pixel-l0.25-b0.75-p2", "ot-ft-pixel-l0.1-b0.35-p2"]
    res = sweep.run_sweep(runs, n=24, seed=0, jobs=2)
    assert set(res) == set(keep)
    for name, r in res.items():
        assert set(r["samplers"]) == {"plain", "sgd", "adam"}
        for s in r["samplers"].values():
            assert s["ot_train"] >= 0 and 0 <= s["memorisation"]["below_train_p5"] <= 1
            assert sum(s["class_share"]) == pytest.approx(1, abs=1e-3)
        assert os.path.exists(os.path.join(runs_dir, name, "grid_plain.png"))
    assert res["ot-ft-pixel-l0.1-b0.35-p2"]["loss_ot"] is not None and res["baseline"]["loss_ot"] is None
    # the fine-tune started from the baseline's weights (its history continues nothing: one epoch)
    again = sweep.run_sweep(runs, n=24, seed=0, jobs=1)  # finished runs are read, not retrained
    assert {k: v["train_time"] for k, v in again.items()} == {k: v["train_time"] for k, v in res.items()}
    meta = dict(dataset="digits", command="python -m diffusion sweep (test)", cpu="test", jobs=2, threads=1,
                wall_minutes=0.5, date="today", n=24, metric_blur=base.metric_blur)
    path = sweep.write_report(res, str(tmp_path / "report"), meta)
    text = open(path).read()
    assert "| claim | ours |" in text and "ot-ft-pixel-l0.1-b0.35-p2" in text
    assert "reduced by more than 50%" in text and "validation loss close" in text
    assert "aggressive" not in text  # no matched (λ 0.25, blur 0.75) / (λ 0.1, blur 0.35) pair ran
    with open(tmp_path / "report" / "table.csv") as f:
        assert len(list(csv.DictReader(f))) == 3 * 3
    saved = json.load(open(tmp_path / "report" / "results.json"))
    assert saved["claims"] and set(saved["results"]) == set(keep)
    assert os.path.getsize(tmp_path / "report" / "scatter.png") > 0
    assert os.path.getsize(tmp_path / "report" / "samples.png") > 0

"""Training: loss goes down, atomic checkpoints, exact resume, config errors, 2-process gloo DDP."""

import os
import socket

import pytest
import torch

import echo.train as tr
from echo.files import atomic_save, read_checkpoint
from echo.train import DistributedBucketSampler, config_from_dict, load_config, train

AUGMENT = {"freq_masks": 2, "freq_width": 8, "time_masks": 2, "time_width": 0.1, "mel_warp": 0.1, "f0_scale": 0.1}


def _cfg(tmp_path, augment=None, **train_kw):
    return config_from_dict({
        "model": {"d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "ffn_dim": 64,
                  "dropout": 0.1, "backend": "chunked"},
        "train": {"out_dir": str(tmp_path / "run"), "batch_size": 8, "lr": 3e-3, "warmup_steps": 4,
                  "max_steps": 8, "eval_every": 0, "ckpt_every": 0, "log_every": 4, "threads": 1, **train_kw},
        "data": {"synthetic": True, "synthetic_size": 32},
        "augment": augment or {},
    })


def test_training_reduces_loss(tmp_path):
    cfg = _cfg(tmp_path, max_steps=40, warmup_steps=5, eval_every=40, eval_max_utts=4)
    cfg.model.dropout = 0.0
    result = train(cfg, quiet=True)
    hist = result["loss_history"]
    assert len(hist) == 40
    assert sum(hist[-5:]) / 5 < 0.7 * sum(hist[:5]) / 5
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "best.pt").exists()


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    ck = torch.load(path, weights_only=True)  # not a training checkpoint: any saved object
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left behind


class _Payload:
    """Unpickling this calls os.mkdir: what a hostile checkpoint could do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_read_checkpoint_never_runs_code_from_the_file(tmp_path):
    target = tmp_path / "created_by_unpickling"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": {}, "config": _Payload(str(target))}, hostile)  # torch.load(weights_only=False) would mkdir
    with pytest.raises(ValueError, match="hostile.pt is not an Echo training checkpoint"):
        read_checkpoint(hostile)
    assert not target.exists()
    atomic_save({"model": {}, "config": {}}, tmp_path / "ok.pt")
    assert read_checkpoint(tmp_path / "ok.pt") == {"model": {}, "config": {}}
    with pytest.raises(ValueError, match="not an Echo training checkpoint"):
        atomic_save({"weights": torch.ones(2)}, tmp_path / "other.pt")
        read_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_atomic_save_gives_an_ordinary_file_mode(tmp_path):
    # mkstemp makes 0600 files: others could not read a checkpoint written through it.
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "x.pt"
    atomic_save({"w": torch.ones(2)}, path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_save({"w": torch.ones(2)}, path, durable=False)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_last_checkpoint_is_scored_with_the_weight_average(tmp_path):
    # With no dev evaluation there is no best.pt; last.pt then stands in, and what is scored must
    # be the average that evaluation would have used, not the raw weights.
    from echo.model import load_model

    train(_cfg(tmp_path, ema_decay=0.9), quiet=True)
    path = tmp_path / "run" / "last.pt"
    ckpt = read_checkpoint(path)
    model, _ = load_model(path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ckpt["ema"]["model"].items())
    assert any(not torch.equal(loaded[k], v) for k, v in ckpt["model"].items())


@pytest.mark.parametrize("augment, extra", [(None, {}), (AUGMENT, {}), (None, {"ema_decay": 0.9})],
                         ids=["plain", "augmented", "weight-average"])
def test_resume_is_exact(tmp_path, augment, extra):
    straight = train(_cfg(tmp_path / "a", augment, **extra), quiet=True)  # 8 steps = 2 epochs of 4 batches

    class Crash(RuntimeError):
        pass

    def crash_at_5(step, model):
        if step == 5:
            raise Crash

    cfg_b = _cfg(tmp_path / "b", augment, ckpt_every=2, **extra)
    with pytest.raises(Crash):
        train(cfg_b, step_callback=crash_at_5, quiet=True)
    assert read_checkpoint(tmp_path / "b" / "run" / "last.pt")["step"] == 4
    resumed = train(cfg_b, resume=True, quiet=True)
    assert resumed["loss_history"] == straight["loss_history"][4:]
    a = read_checkpoint(tmp_path / "a" / "run" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if extra:
        assert a["ema"]["updates"] == b["ema"]["updates"] == 8
        assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])


def test_weight_average_follows_the_ramped_decay_and_is_what_best_pt_holds(tmp_path):
    model = torch.nn.Linear(3, 2)
    average = tr.WeightAverage(model, decay=0.99)
    expected = model.weight.detach().clone()
    for n in range(1, 4):
        with torch.no_grad():
            model.weight.add_(1.0)
        average.update(model)
        decay = min(0.99, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * model.weight.detach()
        assert torch.allclose(average.model.weight, expected, atol=1e-6)
    assert not any(p.requires_grad for p in average.model.parameters())

    cfg = _cfg(tmp_path, ema_decay=0.9, eval_every=8, eval_max_utts=4, eval_decoder="joint")
    cfg.model.ctc_weight = 0.3
    train(cfg, quiet=True)
    best = read_checkpoint(tmp_path / "run" / "best.pt")
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert "ema" not in best and best["step"] == last["step"] == 8
    assert all(torch.equal(best["model"][k], last["ema"]["model"][k]) for k in best["model"])
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_fitted_total_steps_spends_the_budget_on_steps_and_evaluations():
    fit = tr.fitted_total_steps
    assert fit(0, 100.0, 1.0, 0.0, 0, 1000) == 100
    assert fit(0, 100.0, 1.0, 0.0, 0, 80) == 80  # never past max_steps
    # 65 steps + 7 evaluations (at 10, 20, ..., 60 and at the end) cost exactly 100 s; 66 would not fit.
    assert fit(0, 100.0, 1.0, 5.0, 10, 1000) == 65
    assert fit(30, 100.0, 1.0, 5.0, 10, 1000) == 95  # evaluations at 40 ... 90 and at the end
    assert fit(30, 100.0, 1.0, 5.0, 10, 1000) <= fit(30, 100.0, 1.0, 4.0, 10, 1000)
    assert fit(12, -1.0, 1.0, 0.0, 0, 1000) == 12  # out of time: the run ends now


class _FakeClock:
    """``tr._now`` stand-in: one second per optimiser step, nothing else costs time."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def tick(self, step, model) -> None:
        self.t += 1.0


def _fit_cfg(tmp_path, **train_kw):
    # A 60 s budget at 1 s a step (the fake clock): fitted after 1 + 50 timed steps.
    return _cfg(tmp_path, max_steps=1000, warmup_steps=4, max_minutes=1.0, fit_schedule=True, ckpt_every=5,
                **train_kw)


def test_fit_schedule_ends_the_cosine_inside_the_time_budget(tmp_path, monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(tr, "_now", clock)
    cfg = _fit_cfg(tmp_path)
    result = train(cfg, step_callback=clock.tick, quiet=True)
    # At step 51, 51 s gone: 99% of 60 s leaves 8.4 s, so 8 more steps, and the cosine ends annealed there.
    assert result["step"] == result["schedule_steps"] == 59
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last["scheduler"]["_last_lr"][0] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    assert last["elapsed_s"] == pytest.approx(59.0)

    # Without fit_schedule the same budget cuts the 1000-step cosine near its top.
    cut = train(_cfg(tmp_path / "cut", max_steps=1000, warmup_steps=4, max_minutes=1.0), step_callback=clock.tick,
                quiet=True)
    assert cut["step"] == 61 and cut["schedule_steps"] == 1000


def test_fit_schedule_stops_when_an_evaluation_spends_the_rest(tmp_path, monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(tr, "_now", clock)
    evaluated = []

    def slow_evaluation(model, tokenizer, dataset, tc, device):
        evaluated.append(clock())
        clock.t += 8.0
        return {"cer": 0.5, "wer": 0.5}

    monkeypatch.setattr(tr, "_evaluate_dev", slow_evaluation)
    # Fitted to 59 steps at step 51 (evaluations not yet timed); the one at step 55 takes 8 s, after
    # which no step fits: the run ends there, without a second evaluation past the budget.
    result = train(_fit_cfg(tmp_path, eval_every=55), step_callback=clock.tick, quiet=True)
    assert result["step"] == result["schedule_steps"] == 55
    assert evaluated == [1055.0]


def test_fit_schedule_survives_a_resume(tmp_path, monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(tr, "_now", clock)
    cfg = _fit_cfg(tmp_path)

    class Crash(RuntimeError):
        pass

    def crash_at_57(step, model):
        clock.tick(step, model)
        if step == 57:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, step_callback=crash_at_57, quiet=True)
    clock.t += 3600.0  # the restart is not charged to the budget: only checkpointed training time counts
    resumed = train(cfg, resume=True, step_callback=clock.tick, quiet=True)
    assert resumed["step"] == resumed["schedule_steps"] == 59  # the length fitted before the crash
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last["scheduler"]["_last_lr"][0] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    assert last["elapsed_s"] == pytest.approx(59.0)
    # A run whose budget is spent (59 s of 54) takes no further step, whatever its schedule.
    spent = _cfg(tmp_path, max_steps=2000, warmup_steps=4, max_minutes=0.9, ckpt_every=5)
    assert train(spent, resume=True, step_callback=clock.tick, quiet=True)["step"] == 59
    with pytest.raises(ValueError, match="fit_schedule needs a time budget"):
        config_from_dict({"train": {"fit_schedule": True}})


def test_sampler_order_depends_only_on_seed_and_epoch():
    durations = [float(i % 7) for i in range(50)]
    s0 = DistributedBucketSampler(durations, 4, num_replicas=2, rank=0, seed=3)
    s1 = DistributedBucketSampler(durations, 4, num_replicas=2, rank=1, seed=3)
    s0.set_epoch(1)
    s1.set_epoch(1)
    b0, b1 = s0.batches(), s1.batches()
    assert len(b0) == len(b1) == 6
    flat = [i for b in b0 + b1 for i in b]
    assert len(flat) == len(set(flat))
    again = DistributedBucketSampler(durations, 4, num_replicas=2, rank=0, seed=3)
    again.set_epoch(1)
    assert again.batches() == b0
    again.set_epoch(2)
    assert again.batches() != b0


def test_bad_config_is_reported(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({"train": {"lr_max": 1.0}})
    with pytest.raises(ValueError, match="sections"):
        config_from_dict({"optim": {}})
    with pytest.raises(ValueError):
        config_from_dict({"train": {"batch_size": 0}})
    with pytest.raises(ValueError, match="train.eval_decoder must be one of"):
        config_from_dict({"train": {"eval_decoder": "beam"}})
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \[0, 1\)"):
        config_from_dict({"train": {"ema_decay": 1.0}})
    for decoder in ("joint", "ctc"):  # refused up front, not at the first dev evaluation
        with pytest.raises(ValueError, match=f"train.eval_decoder '{decoder}' needs the CTC head"):
            config_from_dict({"model": {"ctc_weight": 0.0}, "train": {"eval_decoder": decoder}})
    with pytest.raises(TypeError):
        config_from_dict({"model": [1, 2]})
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  d_model: 64\ntrain:\n  lr: 0.001\n")
    cfg = load_config(cfg_file, ["train.max_steps=7", "model.bias=null"])
    assert cfg.model.d_model == 64 and cfg.train.max_steps == 7 and cfg.model.bias is None


def test_config_values_are_checked_against_their_types(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string: a float field takes it as the number; a value
    of the wrong type is refused with its section.key, not a TypeError deep in training."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 1e-3\n  betas: [0.9, 1e-2]\n")
    cfg = load_config(cfg_file, ["model.ctc_weight=1e-1", "data.cache_dir=null"])
    assert cfg.train.lr == 0.001 and cfg.train.betas == (0.9, 0.01) and cfg.model.ctc_weight == 0.1
    assert cfg.data.cache_dir is None
    refused = [("train.batch_size=8.5", TypeError, "train.batch_size must be an integer, got 8.5"),
               ("train.fit_schedule=maybe", TypeError, "train.fit_schedule must be true or false"),
               ("model.dropout=abc", TypeError, "model.dropout must be a number, got 'abc'"),
               ("model.d_model=true", TypeError, "model.d_model must be an integer, got True"),
               ("data.corpus=3", TypeError, "data.corpus must be a string"),
               ("train.betas=0.9", TypeError, "train.betas must be a list of 2 values"),
               ("train.betas=[0.9,x]", TypeError, r"train.betas\[1\] must be a number"),
               ("train.eval_every=-5", ValueError, "train.eval_every must be >= 0"),
               ("train.eval_batch_size=0", ValueError, "train.eval_batch_size must be >= 1"),
               ("train.device=tpu", ValueError, "train.device must be one of"),
               ("data.max_duration=-3", ValueError, "data.max_duration must be > 0"),
               ("train.lr=nan", ValueError, "train.lr must be finite, got 'nan'"),
               ("data.max_duration=.inf", ValueError, "data.max_duration must be finite")]
    for override, error, message in refused:
        with pytest.raises(error, match=message):
            load_config(None, [override])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # fit_schedule: the fit after 51 steps must agree across ranks (an all-reduce every rank joins).
    cfg = _cfg(__import__("pathlib").Path(tmp), max_steps=60, ckpt_every=60, max_minutes=10.0, fit_schedule=True)
    cfg.train.device = "cpu"
    checks = []

    def same_weights(step, model):
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        checks.append(all(torch.equal(gathered[0], g) for g in gathered))

    train(cfg, step_callback=same_weights, quiet=True)
    torch.save({"checks": checks}, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_processes_gloo_keep_identical_weights(tmp_path):
    port = _free_port()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        checks = torch.load(tmp_path / f"rank{rank}.pt")["checks"]
        assert checks == [True] * 60
    # Only rank 0 writes: one run folder with one checkpoint.
    ck = read_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["step"] == 60 and len(ck["rng"]) == 2


def test_sampler_module_is_a_distributed_sampler():
    assert issubclass(tr.DistributedBucketSampler, torch.utils.data.DistributedSampler)


def test_word_piece_runs_resume_only_with_the_same_tokenizer(tmp_path):
    cfg = _cfg(tmp_path, max_steps=2)
    cfg.data.tokenizer, cfg.model.vocab_size = "bpe", 50
    tokenizer = tr.make_tokenizer(cfg)
    assert tokenizer.vocab_size == 50 and tokenizer.merges
    train(cfg, quiet=True)
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["tokenizer"] == tokenizer.state()
    cfg.data.tokenizer, cfg.model.vocab_size = "char", 42
    cfg.train.max_steps = 4
    with pytest.raises(ValueError, match="another tokenizer"):
        train(cfg, resume=True, quiet=True)


def test_tokenizer_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer must be one of"):
        config_from_dict({"data": {"tokenizer": "words"}})
    cfg = _cfg(tmp_path)
    cfg.model.vocab_size = 64
    with pytest.raises(ValueError, match=r"model.vocab_size \(64\) != tokenizer size \(42\)"):
        tr.make_tokenizer(cfg)

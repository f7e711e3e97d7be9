"""Decoding: the key/value cache is exact, beam 1 is greedy, transcripts come out as text."""

import re

import numpy as np
import pytest
import torch

from echo.decode import beam_search, decode_batch, greedy_decode
from echo.model import Echo, EchoConfig

TINY = {"d_model": 32, "n_heads": 4, "enc_layers": 1, "dec_layers": 2, "ffn_dim": 64, "dropout": 0.0, "backend": "chunked",
            "max_decode_len": 12}


def _setup(seed=0, **kw):
    torch.manual_seed(seed)
    m = Echo(EchoConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():
        # An untrained decoder mostly echoes its input token (the residual path); louder attention
        # and MLP branches make the greedy paths vary, so the comparisons below mean something.
        for block in m.decoder:
            block.cross_attn.out_proj.weight.mul_(20.0)
            block.self_attn.out_proj.weight.mul_(10.0)
            block.mlp.fc2.weight.mul_(5.0)
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(3, 30, 80, generator=g)
    ml = torch.tensor([30, 22, 9])
    f0 = 90 + 160 * torch.rand(3, 30, generator=g)
    f0[:, 1::3] = 0
    return m, mel, ml, f0


@pytest.mark.parametrize("cross_rotary", [False, True])
def test_cached_steps_match_full_decoder(cross_rotary):
    m, mel, ml, f0 = _setup(cross_rotary=cross_rotary)
    with torch.no_grad():
        enc = m.encode(mel, ml, f0)
        tokens = torch.randint(3, 42, (3, 7))
        tokens[:, 0] = 1
        tf0 = 100 + 100 * torch.rand(3, 7)
        tf0[:, 2] = 0
        full, cross = m.decode(tokens, None, enc, tf0, return_cross=True)
        cache = m.init_cache(enc)
        for t in range(7):
            logits, w = m.step(tokens[:, t], tf0[:, t], enc, cache)
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(w, cross[:, t], atol=1e-6, rtol=1e-4)
    assert cache["self_k"][0].shape[2] == 7


def test_greedy_with_cache_equals_without():
    for pitch in (True, False):
        m, mel, ml, f0 = _setup(pitch=pitch)
        cached = greedy_decode(m, mel, ml, f0, use_cache=True)
        plain = greedy_decode(m, mel, ml, f0, use_cache=False)
        assert cached == plain
        assert any(len(set(x)) > 1 for x in cached)


def test_beam_one_is_greedy_and_batching_is_consistent():
    m, mel, ml, f0 = _setup(seed=1)
    greedy = greedy_decode(m, mel, ml, f0)
    assert beam_search(m, mel, ml, f0, beam=1) == greedy
    alone = [greedy_decode(m, mel[i:i + 1, : int(ml[i])], ml[i:i + 1], f0[i:i + 1, : int(ml[i])])[0]
             for i in range(3)]
    assert alone == greedy


@pytest.mark.parametrize("beam", [1, 3])
def test_beam_search_decodes_each_utterance_of_a_batch_as_alone(beam):
    # The batch's utterances search together (their searches end at different steps and leave the
    # batch); each must get the hypothesis it gets alone, with the CTC prefix scores and the n-gram too.
    from echo.ngram import NgramLM
    from echo.text import CharTokenizer

    m, mel, ml, f0 = _setup(seed=2)
    lm = NgramLM(["a cab", "abba", "bad cab"], CharTokenizer(), order=3)
    for options in ({}, {"ctc_weight": 0.5}, {"lm": lm, "lm_weight": 0.5}):
        together = beam_search(m, mel, ml, f0, beam=beam, **options)
        alone = [beam_search(m, mel[i:i + 1, : int(ml[i])], ml[i:i + 1], f0[i:i + 1, : int(ml[i])], beam=beam,
                             **options)[0] for i in range(3)]
        assert together == alone, options
        assert len({len(ids) for ids in together}) > 1 and any(len(set(ids)) > 1 for ids in together)


def test_greedy_and_beam_one_stop_a_looping_decoder_at_the_same_length():
    # subsample 3: one encoder frame is 30 ms, the length bound counts 20 ms per token.
    m, mel, ml, f0 = _setup(seed=2, subsample=3, max_decode_len=200)
    with torch.no_grad():
        m.embed.weight[m.cfg.eos_id] = -10.0 * m.embed.weight[m.cfg.eos_id].sign()  # <eos> seldom wins
    greedy = greedy_decode(m, mel, ml, f0)
    assert beam_search(m, mel, ml, f0, beam=1) == greedy
    enc_lengths = m.encode(mel, ml, f0).lengths
    limits = (-(-enc_lengths * 3 // 2) + 2).tolist()
    assert all(len(x) <= n for x, n in zip(greedy, limits))
    assert sum(len(x) == n for x, n in zip(greedy, limits)) >= 2  # looped until the bound


def test_beam_search_finds_at_least_greedy_score():
    m, mel, ml, f0 = _setup(seed=2)
    mel, ml, f0 = mel[:1], ml[:1], f0[:1]

    def logprob(ids):
        enc = m.encode(mel, ml, f0)
        cache, total, prev, prev_f0 = m.init_cache(enc), 0.0, 1, torch.zeros(1)
        for tok in ids + [2]:
            logits, w = m.step(torch.tensor([prev]), prev_f0, enc, cache)
            total += float(logits.log_softmax(-1)[0, tok])
            prev, prev_f0 = tok, m.estimate_token_f0(w, enc)
        return total

    with torch.no_grad():
        g = greedy_decode(m, mel, ml, f0)[0]
        b = beam_search(m, mel, ml, f0, beam=4)[0]
        limit = min(int((ml[0] + 1) // 2) + 2, TINY["max_decode_len"])
        if len(g) < limit and len(b) < limit:  # both ended with <eos>: compare complete scores
            assert logprob(b) >= logprob(g) - 1e-5


def test_no_search_emits_a_token_that_no_target_holds():
    # <pad>, <bos> and <unk> never occur in a target (<eos> never in a CTC target): even a model
    # that puts them first must not emit them ("?" for <unk> would be scored as a word break).
    m, mel, ml, f0 = _setup(seed=3)
    cfg = m.cfg
    step, ctc_forward = m.step, m.ctc_head.forward
    loud = torch.zeros(cfg.vocab_size)

    def loud_step(*args):
        logits, cross = step(*args)
        return logits + loud, cross

    m.step = loud_step
    m.ctc_head.forward = lambda states: ctc_forward(states) + loud
    loud[[cfg.pad_id, cfg.bos_id, cfg.unk_id]] = 50.0
    loud[cfg.eos_id] = -50.0  # else this untrained model's runner-up is <eos>, and the output empty
    forbidden = {cfg.pad_id, cfg.bos_id, cfg.unk_id}
    for out in (greedy_decode(m, mel, ml, f0), beam_search(m, mel, ml, f0, beam=3),
                decode_batch(m, mel, ml, f0, decoder="joint", beam=2)):
        assert any(out) and not any(forbidden & set(ids) for ids in out), out
    loud.zero_()
    loud[[cfg.bos_id, cfg.eos_id, cfg.unk_id]] = 50.0
    out = decode_batch(m, mel, ml, f0, decoder="ctc")
    assert any(out) and not any({cfg.bos_id, cfg.eos_id, cfg.unk_id} & set(ids) for ids in out), out


def test_score_normalises_text():
    from echo.evaluate import score

    s = score(["Hello, World!", "it's ok"], ["hello world", "its ok"])
    assert s["wer"] == 0.25 and s["utterances"] == 2
    assert 0 < s["cer"] < 0.1


def test_score_counts_words_said_over_an_empty_reference():
    from echo.evaluate import score

    s = score(["a b", "", "..."], ["a b", "lots of words", ""])
    assert s == {"wer": 1.5, "cer": 13 / 3, "utterances": 3}
    with pytest.raises(ValueError, match="non-empty reference"):
        score(["", "?"], ["a", ""])


def test_score_groups_scores_each_group_on_its_own():
    from echo.evaluate import score, score_groups

    refs, hyps = ["a b", "c d", "e f", "?!"], ["a b", "c x", "y z", "anything"]
    groups = score_groups(refs, hyps, ["flite", "espeak", "espeak", "flite"])
    assert list(groups) == ["espeak", "flite"]
    # "?!" normalises to an empty reference: "anything" is one inserted word, eight characters.
    assert groups["flite"] == {"wer": 0.5, "cer": 8 / 3, "utterances": 2}
    assert groups["espeak"] == score(refs[1:3], hyps[1:3]) and groups["espeak"]["wer"] == 0.75


@pytest.mark.parametrize(("tokenizer", "vocab_size"), [("char", 42), ("bpe", 48)])
def test_cli_transcribe_and_evaluate_on_wavs(tmp_path, capsys, monkeypatch, tokenizer, vocab_size):
    """End to end through the files a user touches: checkpoint -> transcribe / evaluate / attention maps,
    with either tokenizer (the checkpoint carries it)."""
    import json
    import math

    import soundfile as sf

    from echo.__main__ import main as cli
    from echo.model import attention_maps, load_model
    from echo.train import config_from_dict, train

    cfg = config_from_dict({
        "model": {"d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "ffn_dim": 32, "dropout": 0.0,
                  "backend": "chunked", "max_decode_len": 8, "vocab_size": vocab_size},
        "train": {"out_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 1, "eval_every": 0,
                  "ckpt_every": 0, "threads": 1},
        "data": {"synthetic": True, "synthetic_size": 8, "tokenizer": tokenizer},
    })
    train(cfg, quiet=True)
    ckpt = tmp_path / "run" / "last.pt"
    assert type(load_model(ckpt)[1]).__name__ == {"char": "CharTokenizer", "bpe": "BpeTokenizer"}[tokenizer]
    records = []
    for i, hz in enumerate((140.0, 210.0)):
        t = np.arange(8000) / 16000
        sf.write(tmp_path / f"u{i}.wav", 0.3 * np.sin(2 * math.pi * hz * t), 16000, subtype="PCM_16")
        records.append({"audio": f"u{i}.wav", "text": "a b", "duration": 0.5, "speaker": "s", "engine": "tone"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    assert cli(["transcribe", "--checkpoint", str(ckpt), "--device", "cpu", str(tmp_path / "u0.wav")]) == 0
    assert "u0.wav\t" in capsys.readouterr().out
    errors = tmp_path / "errors.tsv"
    assert cli(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(tmp_path / "m.jsonl"), "--device", "cpu",
                "--errors", str(errors)]) == 0
    out = capsys.readouterr().out
    assert "WER" in out and "  tone: WER" in out  # the per-engine line
    assert len(errors.read_text().splitlines()) == 3
    assert cli(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(tmp_path / "m.jsonl"), "--device", "cpu",
                "--decoder", "joint", "--beam", "2", "--ctc-weight", "0.4"]) == 0
    assert "m.joint.beam2.errors.tsv" in capsys.readouterr().out
    assert cli(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(tmp_path / "m.jsonl"), "--device", "cpu",
                "--decoder", "joint", "--beam", "2", "--lm", str(tmp_path / "m.jsonl"), "--lm-weight", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "WER" in out and "m.joint.beam2.lm.errors.tsv" in out  # the greedy and beam tables both survive
    assert cli(["transcribe", "--checkpoint", str(ckpt), "--device", "cpu", "--beam", "2",
                "--lm", str(tmp_path / "m.jsonl"), str(tmp_path / "u0.wav")]) == 0
    assert "u0.wav\t" in capsys.readouterr().out
    # A recording longer than --max-seconds: its three tones (pauses between) decode as one batch.
    import echo.decode

    pause = np.zeros(8000)
    tones = [sf.read(tmp_path / f"u{i % 2}.wav")[0] for i in range(3)]
    sf.write(tmp_path / "long.wav", np.concatenate([pause, tones[0], pause, tones[1], pause, tones[2], pause]), 16000)
    batches, decode_batch = [], echo.decode.decode_batch

    def decode_batch_spy(model, mel, *args, **kwargs):
        batches.append(mel.shape[0])
        return decode_batch(model, mel, *args, **kwargs)

    monkeypatch.setattr(echo.decode, "decode_batch", decode_batch_spy)
    assert cli(["transcribe", "--checkpoint", str(ckpt), "--device", "cpu", "--beam", "2",
                "--max-seconds", "1", str(tmp_path / "long.wav")]) == 0
    assert "long.wav\t" in capsys.readouterr().out and batches == [3]
    monkeypatch.undo()
    maps = attention_maps(ckpt, tmp_path / "u1.wav")
    assert len(maps) == 1 and maps[0].shape[0] == 2 and maps[0].shape[1] == maps[0].shape[2] == 26
    if tokenizer == "char":
        _check_cli_refuses_bad_input(cli, capsys, tmp_path, ckpt)


def _check_cli_refuses_bad_input(cli, capsys, tmp_path, ckpt):
    """Bad options stop before the model loads, naming the option (argparse's status 2); files that
    turn out bad are one line on stderr each (status 1), and the good files are still transcribed."""
    import soundfile as sf

    u0, u1 = str(tmp_path / "u0.wav"), str(tmp_path / "u1.wav")
    refused = [(["--beam", "0"], "--beam must be >= 1, got 0"),
               (["--decoder", "ctc", "--beam", "2"], "--decoder ctc is greedy"),
               (["--ctc-weight", "0.3"], "--ctc-weight needs --decoder joint"),
               (["--decoder", "joint", "--ctc-weight", "2"], r"--ctc-weight must be in \[0, 1\], got 2.0"),
               (["--lm-weight", "0.3"], "--lm-weight needs --lm"),
               (["--lm", str(tmp_path / "none.txt")], "--lm .*none.txt: no such file"),
               (["--device", "bogus"], "--device must be cpu, cuda or cuda:N, got 'bogus'"),
               ([str(tmp_path / "missing.wav")], "no such audio file: .*missing.wav"),
               (["--max-seconds", "-1"], "--max-seconds must be 0 .never cut. or a finite number"),
               (["--max-seconds", "inf"], "--max-seconds must be 0 .never cut. or a finite number")]
    for extra, message in refused:
        with pytest.raises(SystemExit) as stop:
            cli(["transcribe", "--checkpoint", str(ckpt), "--device", "cpu", *extra, u0])
        assert stop.value.code == 2
        assert re.search(message, capsys.readouterr().err), message
    with pytest.raises(SystemExit):
        cli(["transcribe", "--checkpoint", str(tmp_path / "none.pt"), u0])
    assert "--checkpoint " in capsys.readouterr().err
    assert cli(["transcribe", "--checkpoint", u0, u1]) == 1
    assert "u0.wav is not an Echo training checkpoint" in capsys.readouterr().err

    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    (tmp_path / "text.wav").write_text("not audio")
    files = [u0, str(tmp_path / "empty.wav"), str(tmp_path / "text.wav"), u1]
    assert cli(["transcribe", "--checkpoint", str(ckpt), "--device", "cpu", *files]) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [u0, u1]
    assert "empty.wav has no audio samples" in err and "text.wav: cannot transcribe" in err

    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("")
    assert cli(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--device", "cpu"]) == 1
    assert "has no utterances" in capsys.readouterr().err
    manifest.write_text((tmp_path / "m.jsonl").read_text().splitlines()[0] + "\n{broken\n")
    assert cli(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--device", "cpu"]) == 1
    assert "bad.jsonl:2: not a JSON object: '{broken'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["evaluate", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def _force_ctc_path(m, strength):
    """Make the CTC head's frame-wise best path 5 5 blank 5 5 7 blank ..., by a logit margin ``strength``.

    CTC reads it as "5 5 7" (a blank separates repeats).
    """
    blank = m.cfg.pad_id
    path = [5, 5, blank, 5, 5, 7] + [blank] * 30

    def fixed_logits(states):
        logits = torch.zeros(*states.shape[:2], m.cfg.vocab_size)
        for t in range(states.shape[1]):
            logits[:, t, path[t]] = strength
        return logits

    m.ctc_head.forward = fixed_logits


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    m, mel, ml, f0 = _setup(seed=2)
    _force_ctc_path(m, 1.0)
    ids = decode_batch(m, mel, ml, f0, decoder="ctc")
    # Encoder lengths are (T + 1) // 2 = 15, 11 and 5 frames: the third stops before the 7.
    assert ids == [[5, 5, 7], [5, 5, 7], [5, 5]]


def test_joint_decoding_follows_a_confident_ctc_head_and_weight_zero_is_attention_beam_search():
    m, mel, ml, f0 = _setup(seed=2)
    _force_ctc_path(m, 30.0)
    ctc = decode_batch(m, mel, ml, f0, decoder="ctc")
    for beam in (1, 3):
        assert decode_batch(m, mel, ml, f0, decoder="joint", beam=beam, ctc_weight=1.0) == ctc
        # A little attention does not overrule a CTC head this sure.
        assert decode_batch(m, mel, ml, f0, decoder="joint", beam=beam, ctc_weight=0.9) == ctc
    attention = decode_batch(m, mel, ml, f0, beam=3)
    assert attention != ctc  # so that the equalities above say something
    assert decode_batch(m, mel, ml, f0, decoder="joint", beam=3, ctc_weight=0.0) == attention


def test_unknown_decoder_and_missing_ctc_head_are_refused():
    m, mel, ml, f0 = _setup(ctc_weight=0.0)
    with pytest.raises(ValueError, match="decoder must be one of"):
        decode_batch(m, mel, ml, f0, decoder="rnnt")
    for decoder in ("ctc", "joint"):
        with pytest.raises(ValueError, match="CTC head"):
            decode_batch(m, mel, ml, f0, decoder=decoder)
    m, mel, ml, f0 = _setup()
    with pytest.raises(ValueError, match="ctc_weight"):
        decode_batch(m, mel, ml, f0, decoder="joint", ctc_weight=1.5)

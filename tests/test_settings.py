"""The settings, resolved once (options.resolve -> settings.Settings): every flag has one field, every
default its resolved value, and what each schedule means (settings.method), by hand."""
import dataclasses

import pytest

import adapters
import options
import settings


def resolve(tmp_path, *flags):
    return options.resolve(list(flags) + ["--out-dir", str(tmp_path), "--device", "cpu"])


def test_every_flag_is_one_field_of_one_section():
    flags = [a.dest for a in options.build_parser()._actions if a.dest != "help"]
    fields = [f.name for kind in settings.SECTIONS.values() for f in dataclasses.fields(kind)]
    assert len(fields) == len(set(fields))  # no name in two sections
    assert set(fields) - set(flags) == {"world", "rank", "local_rank", "resume_command"}  # the environment's
    assert set(flags) <= set(fields)


def test_the_defaults_are_resolved_under_their_flags_names(tmp_path):
    s = resolve(tmp_path)
    # 4 layers x 6 targets = 24 matrices at r_ref 8: R_target = 192, k = 8 // 2, AdaLoRA from 1.5 r_ref,
    # t_f = 600 // 6; the gpt's rows and pretraining; CPU float32; lr and block warmup stay per schedule
    assert (s.adapter.budget, s.adapter.rank_step, s.adapter.adalora_init_rank, s.adapter.final_warmup) == \
        (192, 4, 12, 100)
    assert (s.data.block_size, s.model.pretrain_iters, s.system.device, s.system.dtype) == \
        (128, 1500, "cpu", "float32")
    assert s.optim.lr is None and s.adapter.block_warmup is None
    assert s.adapter.targets == ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
    assert s.run.schedule == ("linear",) and s.optim.seed == 1337
    assert s.run.resume_command == f"python train.py --out-dir {tmp_path} --device cpu --resume"
    e = resolve(tmp_path, "--arch", "encoder", "--ref-rank", "5", "--targets", "q_proj,v_proj", "--iters", "61")
    # 4 x 2 = 8 matrices: 40; k = 2; 7 triplets; t_f = 10; the encoder's 64-byte rows and 3000 steps
    assert (e.adapter.budget, e.adapter.rank_step, e.adapter.adalora_init_rank, e.adapter.final_warmup) == \
        (40, 2, 7, 10)
    assert (e.data.block_size, e.model.pretrain_iters) == (64, 3000)


def test_settings_are_frozen_and_round_trip_through_a_checkpoint(tmp_path):
    s = resolve(tmp_path, "--schedule", "linear,lora", "--budget", "30")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.adapter.budget = 31
    flat = s.public()
    assert flat["schedule"] == ["linear", "lora"] and flat["budget"] == 30 and "finetune_text" not in flat
    assert settings.Settings.from_public(flat) == s
    assert s.replace(optim={"seed": 1}).optim.seed == 1 and s.optim.seed == 1337


def test_method_turns_each_schedule_into_a_kind(tmp_path):
    s = resolve(tmp_path, "--iters", "300")
    kind, layer, alloc = settings.method(s, "linear")
    assert kind is adapters.KINDS["triadapt"] and layer == dict(rank=1, alpha=16.0, ref_rank=8)
    assert alloc == dict(total_steps=300, target_total_rank=192, interval=5, warmup=20, rank_step=4, top_k=4,
                         max_rank=None, schedule="linear")
    kind, layer, alloc = settings.method(s, "increlora")
    assert kind is adapters.KINDS["increlora"] and layer == dict(rank=1, alpha=16.0, ref_rank=8, core="diagonal",
                                                                 advance=4)
    assert (alloc["schedule"], alloc["importance"], alloc["block_warmup"]) == ("topk", "sensitivity", 10)
    kind, layer, alloc = settings.method(s, "adalora")
    assert kind is adapters.KINDS["adalora"] and layer == dict(rank=12, alpha=16.0, ref_rank=8)
    assert (alloc["init_warmup"], alloc["final_warmup"], alloc["target_total_rank"]) == (20, 50, 192)
    assert settings.method(s, "lora")[:2] == (adapters.KINDS["lora"], dict(rank=8, alpha=16.0))
    assert settings.method(s, "full") == (None, {}, {})
    # an ablation flag makes linear an IncreLoRALinear with TriAdaptLoRA's other choices
    a = resolve(tmp_path, "--advance", "--block-warmup", "3")
    kind, layer, alloc = settings.method(a, "linear")
    assert kind is adapters.KINDS["increlora"] and (layer["core"], layer["advance"]) == ("triangular", 4)
    assert (alloc["importance"], alloc["block_warmup"]) == ("frobenius", 3)
    assert settings.run_name(a, "linear") == "linear-bw3-advance" and settings.run_name(a, "increlora") == \
        "increlora-bw3"
    assert (settings.peak_lr(s, "full"), settings.peak_lr(s, "topk")) == (3e-4, 2e-3)
    assert settings.peak_lr(resolve(tmp_path, "--lr", "1e-3"), "full") == 1e-3


def test_resume_compares_resolved_settings(tmp_path):
    saved = resolve(tmp_path, "--budget", "192").public()  # the default, written out
    options.check_same_settings(saved, resolve(tmp_path), "ckpt.pt", "linear")  # the same run
    with pytest.raises(options.UsageError, match="was made with --budget 192, not 96"):
        options.check_same_settings(saved, resolve(tmp_path, "--budget", "96"), "ckpt.pt", "linear")
    with pytest.raises(options.UsageError, match="was made with --targets q_proj,k_proj,v_proj,out_proj,"
                                                 "fc_in,fc_out, not q_proj,v_proj"):
        options.check_same_settings(saved, resolve(tmp_path, "--targets", "q_proj,v_proj"), "ckpt.pt", "lora")
    # the budget is not part of full fine-tuning's trajectory
    options.check_same_settings(saved, resolve(tmp_path, "--budget", "96"), "ckpt.pt", "full")


def test_resume_resolves_the_defaults_that_depend_on_the_schedule(tmp_path):
    saved = resolve(tmp_path).public()  # --lr and --block-warmup left to the schedule
    options.check_same_settings(saved, resolve(tmp_path, "--lr", "2e-3"), "ckpt.pt", "linear")  # its default
    with pytest.raises(options.UsageError, match="was made with --lr None, not 0.002"):
        options.check_same_settings(saved, resolve(tmp_path, "--lr", "2e-3"), "ckpt.pt", "full")  # 3e-4
    options.check_same_settings(saved, resolve(tmp_path, "--block-warmup", "10"), "ckpt.pt", "increlora")
    with pytest.raises(options.UsageError, match="was made with --block-warmup None, not 9"):
        options.check_same_settings(saved, resolve(tmp_path, "--block-warmup", "9"), "ckpt.pt", "increlora")
    with pytest.raises(options.UsageError, match="is not a training checkpoint"):
        options.check_same_settings({"lr": None}, resolve(tmp_path), "ckpt.pt", "linear")

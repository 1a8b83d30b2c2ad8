"""C2C benchmark: train the fuser and its fair control, evaluate five methods, write the report.

One process does everything that needs the models, so they are loaded once (GGUF dequantisation costs
about a minute on the GPU machine). Phases, each skippable and each leaving its files under `--out`:

  save-hf only load --receiver and keep a dequantised copy under --save-hf (the GPU scripts run one such
          process per model, side by side, instead of dequantising both in one)
  train   fuser for (receiver ← sharer) → c2c.safetensors; the same fuser with the receiver as its own
          sharer, same data, same steps, same fused layers → control.safetensors
  eval    receiver, sharer, c2c, control, t2t on ARC-Easy, ARC-Challenge, OpenBookQA test sets
          (option log-likelihood, Wilson 95% CI) + latency per question → results.json (rewritten
          after every method, so a timeout keeps what finished)
  fold    the training summaries of fusers trained in their own processes (OUT/train-c2c, OUT/train-control,
          as c2c_variants.sh and c2c_reverse.sh run them) → OUT/results.json
  merge   c2c_variants.sh's recipe runs (--variants DIR) → results["recipes"] of --results, chosen on dev
  report  results.json → docs/BENCHMARKS.md (section "c2c") and docs/C2C.md (section "c2c-results");
          --section names another pair of sections (e.g. c2c-reverse for Gemma-3 ← SmolLM2)

Reproduce (GPU machine, models staged as in ../shared/gpu/README.md):
  python benchmarks/c2c_eval.py --receiver /root/models/smollm2-135m-instruct-q4_1.gguf \\
      --sharer /root/models/gemma-3-270m-q4_k_m.gguf --data ../shared/data --out OUT --device cuda
and on any machine, from the results: python benchmarks/c2c_eval.py --phases report --results FILE
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from cachelm.c2c.data import PROMPT_STYLES

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("receiver", "sharer", "c2c", "control", "t2t")
# Packaged model → (full name, short name), for the report's labels.
MODEL_NAMES = {"smollm2": ("SmolLM2-135M", "SmolLM2"), "gemma3": ("Gemma-3-270M", "Gemma-3")}


def model_key(path_or_name: str) -> str | None:
    """The packaged model a model argument names (its name, its GGUF file or a folder named after it)."""
    text = Path(path_or_name).name.lower().replace("-", "").replace("_", "")
    return next((key for key in MODEL_NAMES if key in text), None)


def model_pair(meta: dict[str, Any]) -> tuple[str, str]:
    """(receiver, sharer) a results file names; the first pair (SmolLM2 ← Gemma-3) when it names none."""
    return meta.get("receiver_model", "smollm2"), meta.get("sharer_model", "gemma3")


def labels(meta: dict[str, Any]) -> dict[str, str]:
    """Row labels for the methods."""
    receiver, sharer = model_pair(meta)
    r_full = MODEL_NAMES.get(receiver, (receiver, receiver))[0]
    s_full, s_short = MODEL_NAMES.get(sharer, (sharer, sharer))
    return {
        "receiver": f"receiver alone ({r_full})",
        "sharer": f"sharer alone ({s_full})",
        "t2t": "text-to-text (sharer hint → receiver)",
        "control": "fair control (receiver ← itself)",
        "c2c": f"C2C (receiver ← {s_short} cache)",
    }


SETS = ("arc_easy", "arc_challenge", "openbookqa")
SET_LABELS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "openbookqa": "OpenBookQA"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_copy(model: str, save_hf: Path, device: str, loaded: Any = None) -> Path:
    """Keep a dequantised copy of `model` (a GGUF file or a packaged name) in SAVE_HF/<model key>, named
    after the model so either direction can load it; `loaded` is the model when already loaded (else it is
    loaded here). A copy already there is kept. Returns its folder."""
    target = save_hf / (model_key(model) or Path(model).stem)
    if not (target / "config.json").is_file():
        if loaded is None:
            import torch

            from cachelm.c2c import pair

            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            loaded = pair.load(model, device=device, dtype=dtype)
        _save_hf(loaded, target)
        log(f"saved {target}")
    return target


def _save_hf(loaded: Any, target: Path) -> None:
    """Keep a dequantised copy so a later run on the same machine skips GGUF dequantisation."""
    model = loaded.model
    # transformers refuses to serialise a GGUF-loaded model; the weights are plain tensors after loading.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    loaded.tokenizer.save_pretrained(target)
    from cachelm.c2c import pair

    pair.save_source_record(loaded, target)  # checkpoints trained on the copy keep the GGUF's hash


def _fuser_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fuser's shape, span and alignment, the same for the C2C fuser and its fair control (the token
    alignment follows from the span unless --token-alignment names one)."""
    return {
        "hidden_dim": args.hidden,
        "fuse_span": args.fuse_span,
        "layer_map": args.layer_map,
        "token_alignment": args.token_alignment,
        "sharer_positions": args.sharer_positions,
    }


def train_phase(args: argparse.Namespace, receiver: Any, sharer: Any, results: dict[str, Any]) -> None:
    import torch

    from cachelm.c2c import data as c2c_data
    from cachelm.c2c import pair
    from cachelm.c2c.checkpoint import save_fuser
    from cachelm.c2c.train import TrainConfig, train_fuser

    examples = c2c_data.load_training(
        args.data, instructions=args.instructions, prompt_style=args.prompt_style
    )
    steps = args.steps
    if args.train_budget_s is not None and steps is None:
        per_step = time_train_step(receiver, sharer, examples, args)
        planned = TrainConfig(epochs=args.epochs, batch_size=args.batch_size).total_steps(len(examples))
        # Both fusers get the same number of steps (the control's sharer is the cheaper receiver).
        steps = max(1, min(planned, int(args.train_budget_s / (2.1 * per_step))))
        log(f"train step {per_step * 1000:.0f} ms → {steps} steps per fuser (epochs would give {planned})")
    cfg = TrainConfig(
        epochs=args.epochs,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        save_every=25,  # a run cut short by the device time limit resumes from --state-dir
        mc_weight=args.mc_weight,
        distill_weight=args.distill_weight,
        seed=args.seed,
    )
    c2c = pair.new_fuser(receiver, sharer, seed=args.seed, **_fuser_options(args))
    fused_layers = tuple(r for r, _ in c2c.config.layer_map)
    control = pair.new_fuser(
        receiver, receiver, receiver_layers=fused_layers, seed=args.seed, **_fuser_options(args)
    )
    for name, fuser, sh in (("c2c", c2c, sharer), ("control", control, receiver)):
        if name not in args.methods:
            continue
        target = args.out / f"{name}.safetensors"
        if target.is_file():
            log(f"{target} exists, not training {name}")
            continue
        log(f"training {name}: {sum(p.numel() for p in fuser.parameters()) / 1e6:.2f}M params")
        torch.manual_seed(args.seed)  # the gates' Gumbel noise
        info = train_fuser(
            pair.pipeline(receiver, sh, fuser), examples, cfg, state_path=args.state_dir / name
        )
        info["data"] = "ARC-Easy/Challenge train, OpenBookQA train, alpaca_5000"
        info["prompt_style"] = args.prompt_style
        log(f"{name}: {json.dumps({k: v for k, v in info.items() if k != 'config'})}")
        save_fuser(
            fuser,
            target,
            receiver_fingerprint=receiver.fingerprint,
            sharer_fingerprint=sh.fingerprint,
            receiver_file_sha256=receiver.file_sha256,
            sharer_file_sha256=sh.file_sha256,
            train_info=info,
        )
        results.setdefault("train", {})[name] = {k: v for k, v in info.items()}
        results["train"][name]["bytes"] = target.stat().st_size


def time_train_step(receiver: Any, sharer: Any, examples: list[Any], args: argparse.Namespace) -> float:
    """Seconds per C2C training step, measured on a throwaway fuser (3 warm-up + 8 timed steps)."""
    import torch

    from cachelm.c2c import pair
    from cachelm.c2c.train import attention_for_training

    fuser = pair.new_fuser(receiver, sharer, **_fuser_options(args))
    pipe = pair.pipeline(receiver, sharer, fuser)
    fuser.train()
    opt = torch.optim.AdamW(fuser.parameters(), lr=1e-4)
    tok = receiver.tokenizer
    started = 0.0
    for i in range(11):
        batch = examples[i * args.batch_size : (i + 1) * args.batch_size]
        responses = [tok(" " + e.response, add_special_tokens=False)["input_ids"][:48] for e in batch]
        if i == 3:
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with attention_for_training(pipe.device):  # the kernels training uses
            loss = pipe.loss([e.prompt for e in batch], responses)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad(set_to_none=True)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / 8


def eval_phase(
    args: argparse.Namespace, receiver: Any, sharer: Any, results: dict[str, Any], t0: float
) -> None:
    import torch

    from cachelm.c2c import data as c2c_data
    from cachelm.c2c import evaluate as ev
    from cachelm.c2c import pair

    def ckpt(name: str) -> Path:
        for d in (args.out, args.checkpoint_dir):
            if d is not None and (d / f"{name}.safetensors").is_file():
                return Path(d) / f"{name}.safetensors"
        raise FileNotFoundError(f"{name}.safetensors not in {args.out} or {args.checkpoint_dir}")

    split = "Test" if args.split == "test" else "Dev"  # the split's name in the data files
    sets = {s: c2c_data.load_questions(args.data, s, split, args.prompt_style)[: args.limit] for s in SETS}
    alone_r, alone_s = pair.pipeline(receiver), pair.pipeline(sharer)
    device = alone_r.device
    acc = results.setdefault("accuracy" if args.split == "test" else "dev_accuracy", {})
    lat = results.setdefault("latency", {})
    for method in args.methods:
        if time.perf_counter() - t0 > args.deadline_s:
            log(f"deadline reached, skipping {method}")
            continue
        log(f"eval {method}")
        if method == "receiver":
            pipe = alone_r
        elif method == "sharer":
            pipe = alone_s
        elif method in ("c2c", "control"):
            sh = sharer if method == "c2c" else receiver
            pipe = pair.pipeline(receiver, sh, pair.load_checkpoint(ckpt(method), receiver, sh))
        else:
            pipe = alone_r
        for s, questions in sets.items():
            if (method, s) in {(m, x) for m in acc for x in acc[m]}:
                continue
            started = time.perf_counter()
            prompts = None
            extra: dict[str, Any] = {}
            if method == "t2t":
                hints = ev.make_hints(
                    alone_s, questions, max_new_tokens=args.hint_tokens, batch_size=args.gen_batch
                )
                prompts = [ev.hint_prompt(q, h) for q, h in zip(questions, hints, strict=True)]
                extra["hint_examples"] = hints[:5]
            res = ev.score_questions(pipe, questions, prompts=prompts, batch_size=args.eval_batch)
            acc.setdefault(method, {})[s] = {
                **res.as_dict(),
                **extra,
                "seconds": time.perf_counter() - started,
            }
            log(f"  {s}: acc {res.acc:.4f} norm {res.acc_norm:.4f} ({time.perf_counter() - started:.1f}s)")
            write_results(args, results)
        if args.split != "test" or args.latency_n == 0 or method in lat:
            continue  # a resumed run keeps the latency it measured
        lq = sets["arc_easy"][: args.latency_n]
        if method == "t2t":
            probe = ev.t2t_answer(alone_s, alone_r, args.answer_tokens, args.hint_tokens)
        else:
            probe = ev.direct_answer(pipe, args.answer_tokens)
        probe(lq[0]).__next__()  # warm-up: first CUDA kernels and allocations
        lat[method] = ev.measure_latency(probe, lq, device)
        lat[method]["answer_tokens"] = args.answer_tokens
        log(f"  latency {lat[method]}")
        write_results(args, results)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def write_results(args: argparse.Namespace, results: dict[str, Any]) -> None:
    path = args.out / "results.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def paired_bootstrap(
    a: list[int], b: list[int], answers: list[int], n: int = 2000
) -> tuple[float, float, float]:
    """Accuracy difference a − b (points) with a 95% paired bootstrap interval over questions."""
    return bootstrap_mean(_right_minus(a, b, answers), n)


def _right_minus(a: list[int], b: list[int], answers: list[int]) -> list[float]:
    """Per question: 1 where only `a` is right, −1 where only `b` is, else 0."""
    return [int(x == y) - int(z == y) for x, z, y in zip(a, b, answers, strict=True)]


def bootstrap_mean(values: list[float], n: int = 2000) -> tuple[float, float, float]:
    """Mean of per-question values in points, with a 95% bootstrap interval over questions."""
    import random

    rng = random.Random(0)
    k = len(values)
    stats = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return 100 * sum(values) / k, 100 * stats[int(0.025 * n)], 100 * stats[int(0.975 * n) - 1]


def targets(results: dict[str, Any], answers: dict[str, list[int]]) -> str:
    """The issue's targets, each with the measured value and whether it is met."""
    acc, lat = results["accuracy"], results["latency"]
    rows = ["| target | measured | met |", "|---|---|---|"]

    def pct(m: str, s: str) -> float:
        return float(100 * acc[m][s]["acc"])

    for s in SETS:
        best = max(pct("receiver", s), pct("sharer", s))
        rows.append(
            f"| {SET_LABELS[s]}: C2C ≥ better single model + 3 | {pct('c2c', s):.1f} vs {best:.1f} + 3 "
            f"| {'yes' if pct('c2c', s) >= best + 3 else 'no'} |"
        )
        rows.append(
            f"| {SET_LABELS[s]}: C2C ≥ text-to-text + 2 | {pct('c2c', s):.1f} vs {pct('t2t', s):.1f} + 2 "
            f"| {'yes' if pct('c2c', s) >= pct('t2t', s) + 2 else 'no'} |"
        )
    for s in SETS:
        if s in answers:
            d, lo, hi = paired_bootstrap(
                acc["c2c"][s]["predictions"], acc["control"][s]["predictions"], answers[s]
            )
            goal = " (target ≥ +2)" if s == "arc_easy" else ""
            met = ("yes" if d >= 2 else "no") if s == "arc_easy" else "—"
            rows.append(
                f"| {SET_LABELS[s]}: C2C − fair control{goal} | {d:+.1f} points "
                f"[95% paired bootstrap {lo:+.1f}, {hi:+.1f}] | {met} |"
            )
    if "c2c" in lat and "t2t" in lat:
        for key, name in (("ttft_mean_s", "TTFT"), ("total_mean_s", "total")):
            ratio = lat["t2t"][key] / lat["c2c"][key]
            rows.append(
                f"| ≥ 2× faster than text-to-text ({name}) | {ratio:.1f}× "
                f"({1000 * lat['c2c'][key]:.0f} ms vs {1000 * lat['t2t'][key]:.0f} ms) "
                f"| {'yes' if ratio >= 2 else 'no'} |"
            )
    size = results.get("train", {}).get("c2c", {}).get("bytes")
    if size:
        rows.append(f"| fuser ≤ 16 MB | {size / 1e6:.1f} MB | {'yes' if size <= 16e6 else 'no'} |")
    return "\n".join(rows)


def objective(config: dict[str, Any]) -> str:
    """The training loss of a fuser, from its TrainConfig."""
    text = "next-token loss on the response tokens"
    if config.get("mc_weight"):
        text += f" + {config['mc_weight']:g} × cross-entropy over each multiple-choice question's options"
    if config.get("distill_weight"):
        text += f" + {config['distill_weight']:g} × KL from the sharer alone's option distribution"
    return text


def _acc_cell(r: dict[str, Any] | None) -> str:
    """Accuracy in percent with its 95% interval, or a dash when the cell was not measured."""
    if not r:
        return "—"
    return f"{100 * r['acc']:.1f} [{100 * r['acc_ci'][0]:.1f}, {100 * r['acc_ci'][1]:.1f}]"


def report(results: dict[str, Any], answers: dict[str, list[int]] | None = None) -> str:
    """Markdown: accuracy with 95% CI per set and latency per method, then the targets check."""
    acc, lat = results.get("accuracy", {}), results.get("latency", {})
    head = "| method | " + " | ".join(f"{SET_LABELS[s]} acc % [95% CI]" for s in SETS)
    head += " | TTFT ms | total ms |\n|---|" + "---|" * (len(SETS) + 2) + "\n"
    meta = results.get("meta", {})
    names = labels(meta)
    rows = []
    for m in ("receiver", "sharer", "t2t", "control", "c2c"):
        if m not in acc and m not in lat:
            continue
        cells = [_acc_cell(acc.get(m, {}).get(s)) for s in SETS]
        lm = lat.get(m)
        times = [f"{1000 * lm['ttft_mean_s']:.0f}", f"{1000 * lm['total_mean_s']:.0f}"] if lm else ["—", "—"]
        rows.append(f"| {names[m]} | " + " | ".join(cells + times) + " |")
    train = results.get("train", {})
    lines = [head + "\n".join(rows), ""]
    sizes = ", ".join(f"{SET_LABELS[s]} n={acc.get('receiver', {}).get(s, {}).get('n', '?')}" for s in SETS)
    prompt = (
        '"Question: …\\nA. …\\nB. …\\nAnswer:" (options listed)'
        if meta.get("prompt_style") == "options"
        else '"Question: …\\nAnswer:"'
    )
    lines.append(
        'Scoring: zero-shot option log-likelihood (`acc`: highest summed log-probability of " <option>" '
        f"after {prompt}), 95% Wilson intervals, full test sets ({sizes}). "
        "acc_norm (per-character) is in the results file."
    )
    if lat:
        n = next(iter(lat.values()))
        lines.append(
            f"Latency: mean over the first {n['n']} ARC-Easy test questions, batch size 1, greedy generation "
            f"of {n['answer_tokens']} answer tokens; t2t includes the sharer's "
            f"{meta.get('hint_tokens', '?')}-token "
            "hint before the receiver's first token."
        )
    if train:
        parts = []
        for name, info in train.items():
            parts.append(
                f"{name}: {info['steps']} steps × batch {info['config']['batch_size']}, "
                f"{info['seconds']:.0f} s, loss {info['first_loss']:.3f} → {info['final_loss']:.3f}, "
                f"{info['open_gates']} gates open, {info['bytes'] / 1e6:.1f} MB"
            )
        lines.append("Training: " + "; ".join(parts) + ".")
        lines.append(f"Objective: {objective(next(iter(train.values()))['config'])}.")
    if meta:
        lines.append(f"Machine: {meta.get('machine', '?')}.")
        if meta.get("baselines_machine"):
            lines.append(
                "The receiver, sharer and t2t rows come from an earlier run on another H100 host "
                f"({meta['baselines_machine']}); compare their latency with care."
            )
        for what, cmd in meta.get("runs", {"run": meta.get("command", "?")}).items():
            lines.append(f"- {what}: `{cmd}`")
    if answers and all(m in acc for m in ("c2c", "control", "receiver", "sharer", "t2t")):
        stated = ""
        if model_pair(meta) != ("smollm2", "gemma3"):
            stated = ", stated for SmolLM2 ← Gemma-3, applied to this pair"
        lines += ["", f"Targets (issue 5{stated}):", "", targets(results, answers)]
        lines += [
            "",
            "Does C2C use the sharer? (`sharer_reliance`, from the per-question predictions above)",
            "",
            sharer_reliance(acc["c2c"], acc["control"], acc["sharer"], answers),
        ]
    if "recipes" in results:
        lines += ["", "Recipe variants, chosen on dev:", "", recipes_report(results, answers or {})]
        for name, run in results["recipes"].items():
            if name != results.get("chosen_recipe") and answers and "sharer" in acc and "accuracy" in run:
                lines += [
                    "",
                    f"Does {name}'s C2C use the sharer?",
                    "",
                    sharer_reliance(
                        run["accuracy"]["c2c"], run["accuracy"]["control"], acc["sharer"], answers
                    ),
                ]
    for key, (tag, intro) in VARIANTS.items():
        if key not in results:
            continue
        lines += ["", variant_report(results[key], answers or {}, tag, intro, names)]
        if answers and "sharer" in acc:
            run = results[key]["accuracy"]
            lines += ["", sharer_reliance(run["c2c"], run["control"], acc["sharer"], answers)]
    return "\n".join(lines)


def _right_share(pred: list[int], gold: list[int], idx: list[int]) -> str:
    share = sum(pred[i] == gold[i] for i in idx) / max(1, len(idx))
    return f"{100 * share:.1f}% of {len(idx)}"


def _same_share(a: list[int], b: list[int]) -> str:
    return f"{100 * sum(x == y for x, y in zip(a, b, strict=True)) / len(a):.1f}%"


def sharer_reliance(
    c2c: dict[str, Any], control: dict[str, Any], sharer: dict[str, Any], answers: dict[str, list[int]]
) -> str:
    """Does C2C use the sharer? Per test set, from the stored per-question predictions: how often C2C is
    right where the sharer alone is right and the fair control wrong (what the sharer could add) and where
    it is the other way round (what following the sharer could cost), and how often C2C and the control
    pick the sharer's option. A fuser that reads the sharer moves the first number up and its picks
    towards the sharer's; one that learned only the task stays with the control."""
    rows = [
        "| set | sharer right, control wrong: C2C right | sharer wrong, control right: C2C right "
        "| C2C picks the sharer's option | control picks it | C2C picks the control's |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETS:
        if s not in answers:
            continue
        gold = answers[s]
        c, k, h = (m[s]["predictions"] for m in (c2c, control, sharer))
        gain = [i for i, y in enumerate(gold) if h[i] == y and k[i] != y]
        loss = [i for i, y in enumerate(gold) if h[i] != y and k[i] == y]
        cells = [_right_share(c, gold, gain), _right_share(c, gold, loss)]
        cells += [_same_share(c, h), _same_share(k, h), _same_share(c, k)]
        rows.append(f"| {SET_LABELS[s]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


VARIANTS = {
    "next_token_only": (
        "next-token",
        "**Next-token loss only** (no option objective; the pair committed before): same data, steps, fuser "
        "and context-only fusion as above, trained on the receiver's response tokens alone.",
    ),
    "fuse_all": (
        "all",
        '**Every position fused** (`fuse_span="all"`, causal token alignment, next-token loss only): the '
        "sharer also reads the option being scored, and the fuser writes into the receiver's K/V of every "
        "token, the option's included. Same data, steps and fuser width; the control again uses the "
        "receiver as its own sharer.",
    ),
}


def variant_report(
    run: dict[str, Any], answers: dict[str, list[int]], tag: str, intro: str, names: dict[str, str]
) -> str:
    """A trained variant's C2C and fair control (accuracy, latency, C2C − control, training)."""
    acc, lat, train = run["accuracy"], run.get("latency", {}), run.get("train", {})
    lines = [
        intro,
        "",
        "| method | "
        + " | ".join(f"{SET_LABELS[s]} acc % [95% CI]" for s in SETS)
        + " | TTFT ms | total ms |",
        "|---|" + "---|" * (len(SETS) + 2),
    ]
    for m in ("control", "c2c"):
        cells = [_acc_cell(acc[m][s]) for s in SETS]
        lm = lat.get(m)
        times = [f"{1000 * lm['ttft_mean_s']:.0f}", f"{1000 * lm['total_mean_s']:.0f}"] if lm else ["—", "—"]
        lines.append(f"| {names[m]} ({tag}) | " + " | ".join(cells + times) + " |")
    diffs = []
    for s in SETS:
        if s in answers:
            d, lo, hi = paired_bootstrap(
                acc["c2c"][s]["predictions"], acc["control"][s]["predictions"], answers[s]
            )
            diffs.append(f"{SET_LABELS[s]} {d:+.1f} [{lo:+.1f}, {hi:+.1f}]")
    lines.append("")
    if diffs:
        lines.append("C2C − fair control, points [95% paired bootstrap]: " + "; ".join(diffs) + ".")
    parts = [
        f"{name}: {info['steps']} steps, {info['seconds']:.0f} s, loss {info['first_loss']:.3f} → "
        f"{info['final_loss']:.3f}, {info.get('skipped_steps', 0)} steps skipped (non-finite gradient)"
        for name, info in train.items()
    ]
    if parts:
        lines.append("Training: " + "; ".join(parts) + ".")
    for what, cmd in run.get("runs", {}).items():
        lines.append(f"- {what}: `{cmd}`")
    return "\n".join(lines)


def _gap_cell(acc: dict[str, Any], s: str, answers: dict[str, list[int]], bold: bool = False) -> str:
    """ "C2C / control / Δ" on set `s` in points (Δ in bold if asked), with the 95% paired bootstrap
    interval when `answers` has the set; a dash when either was not measured."""
    if s not in acc.get("c2c", {}) or s not in acc.get("control", {}):
        return "—"
    c, k = (100 * acc[m][s]["acc"] for m in ("c2c", "control"))
    gap = f"**{c - k:+.1f}**" if bold else f"{c - k:+.1f}"
    cell = f"{c:.1f} / {k:.1f} / {gap}"
    if s in answers:
        _, lo, hi = paired_bootstrap(
            acc["c2c"][s]["predictions"], acc["control"][s]["predictions"], answers[s]
        )
        cell += f" [{lo:+.1f}, {hi:+.1f}]"
    return cell


def _mean_gap(accs: list[dict[str, Any]], s: str, answers: dict[str, list[int]]) -> str:
    """Mean C2C − control on set `s` in points over the runs that measured both, with a 95% bootstrap
    interval over questions of the per-question mean (when `answers` has the set): the gap these recipes
    share, with less of any one run's luck. A dash when no run measured it."""
    runs = [a for a in accs if s in a.get("c2c", {}) and s in a.get("control", {})]
    if not runs:
        return "—"
    gaps = [100 * (a["c2c"][s]["acc"] - a["control"][s]["acc"]) for a in runs]
    cell = f"{sum(gaps) / len(gaps):+.1f} (n = {len(gaps)})"
    if s in answers:
        diffs = [
            _right_minus(a["c2c"][s]["predictions"], a["control"][s]["predictions"], answers[s]) for a in runs
        ]
        _, lo, hi = bootstrap_mean([sum(q) / len(runs) for q in zip(*diffs, strict=True)])
        cell += f" [{lo:+.1f}, {hi:+.1f}]"
    return cell


def _train_cell(method: str, train: dict[str, Any]) -> str:
    """`c2c 420 steps, 215 s, loss 9.3 → 6.8`, and how a resumed run's time was counted.

    `resumed_at_step`: train_fuser's own record (its seconds include the saved steps' time);
    `seconds_from_step`: a run from before it did so, whose seconds cover only the steps after the resume.
    """
    where = ""
    if train.get("resumed_at_step") is not None:
        where = f" (resumed at step {train['resumed_at_step']})"
    elif train.get("seconds_from_step") is not None:
        where = f" for steps {train['seconds_from_step']}–{train['steps']} (resumed; earlier time not kept)"
    return (
        f"{method} {train['steps']} steps, {train['seconds']:.0f} s{where}, loss "
        f"{train['first_loss']:.3f} → {train['final_loss']:.3f}"
    )


def recipes_report(results: dict[str, Any], answers: dict[str, list[int]]) -> str:
    """Recipe variants trained side by side (benchmarks/c2c_variants.sh) and the one chosen on dev.

    `results["recipes"]`: name → {"recipe", "dev_accuracy", "accuracy", "train"}; the choice
    (`results["chosen_recipe"]`) is the largest C2C − control on ARC-Easy *dev*, so the test numbers
    below never picked anything.
    """
    recipes = results["recipes"]
    chosen = results.get("chosen_recipe")
    lines = [
        "| recipe | ARC-Easy dev: C2C / control / Δ | "
        + " | ".join(f"{SET_LABELS[s]} test: C2C / control / Δ [95% CI]" for s in SETS)
        + " |",
        "|---|---|" + "---|" * len(SETS),
    ]
    for name, run in recipes.items():
        dev, test = run.get("dev_accuracy", {}), run.get("accuracy", {})
        cells = [_gap_cell(dev, "arc_easy", {}, bold=True)]
        cells += [_gap_cell(test, s, answers) for s in SETS]
        label = f"**{name}** (chosen)" if name == chosen else name
        lines.append(f"| {label}: {run['recipe']} | " + " | ".join(cells) + " |")
    # The committed recipe's reruns with other seeds ("seedN") measure how much luck is in one run.
    seeds = [name for name in recipes if name == "base" or re.fullmatch(r"seed\d+", name)]
    groups = [(f"mean Δ over the {len(recipes)} recipes", list(recipes))]
    if len(seeds) > 1:
        groups.append((f"mean Δ over the committed recipe's {len(seeds)} seeds ({', '.join(seeds)})", seeds))
    # `answers` holds the test sets' answers: the dev cell has no interval, as above.
    columns = [("dev_accuracy", "arc_easy", {})] + [("accuracy", s, answers) for s in SETS]
    for title, names in groups:
        mean = [_mean_gap([recipes[n].get(split, {}) for n in names], s, keys) for split, s, keys in columns]
        lines.append(f"| {title} | " + " | ".join(mean) + " |")
    lines.append("")
    lines.append(
        "Each recipe trains its C2C fuser and its fair control with the same settings; every recipe uses "
        "batch 32, lr 1e-3 and the option objective (option cross-entropy weight 1), and context fusion "
        "unless it says every position is fused. The "
        "recipe is chosen by C2C − control on the ARC-Easy *dev* split (570 questions); the test columns "
        "are reported, never used to choose."
    )
    for name, run in recipes.items():
        train = run.get("train", {})
        if all(m in train for m in ("c2c", "control")):
            lines.append(
                f"Training of {name}: "
                + "; ".join(_train_cell(m, train[m]) for m in ("c2c", "control"))
                + (f" ({run['note']})" if run.get("note") else "")
                + "."
            )
    return "\n".join(lines)


def describe_recipe(flags: str) -> str:
    """c2c_variants.sh's flags in words: "--steps 420 --distill-weight 3 --seed 2" → "420 steps, KL weight 3,
    seed 2". Flags it does not know stay as written, so nothing is hidden."""
    words = {
        "--steps": "{} steps",
        "--distill-weight": "KL weight {}",
        "--seed": "seed {}",
        "--hidden": "fuser width {}",
        "--lr": "lr {}",
        "--instructions": "{} instructions",
        "--fuse-span all": "every position fused",
        "--fuse-span context": "context fused",
        "--layer-map uniform": "every receiver layer fused (uniform layer map)",
        "--token-alignment mean": "mean token alignment",
        "--token-alignment last": "last-character token alignment",
        "--token-alignment causal": "causal token alignment",
        "--sharer-positions own": "sharer keeps its own positions",
    }
    tokens, parts = flags.split(), []
    while tokens:
        flag = tokens.pop(0)
        value = tokens.pop(0) if tokens and not tokens[0].startswith("--") else None
        if f"{flag} {value}" in words:  # a flag whose value changes the words
            parts.append(words[f"{flag} {value}"])
        elif flag in words and value is not None:
            parts.append(words[flag].format(value))
        else:
            parts.append(flag if value is None else f"{flag} {value}")
    return ", ".join(parts)


def fold_training(run: Path) -> dict[str, Any]:
    """Copy the training summary of each fuser trained in its own process (`run/train-c2c`,
    `run/train-control`) into `run/results.json` (created when missing); returns the merged results."""
    path = run / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    parts = [run / f"train-{m}" / "results.json" for m in ("c2c", "control")]
    parts = [part for part in parts if part.is_file()]
    for part in parts:
        results.setdefault("train", {}).update(json.loads(part.read_text()).get("train", {}))
    if parts:  # nothing trained here (e.g. the committed pair, copied in): nothing to write
        path.write_text(json.dumps(results, indent=1))
    return results


def merge_recipes(results: dict[str, Any], variants: Path) -> list[str]:
    """Fold the runs of benchmarks/c2c_variants.sh (its `variants.tar.gz`, extracted into `variants`:
    one folder per recipe with results.json and recipe.txt) into `results["recipes"]`, and choose again:
    the largest C2C − control on ARC-Easy dev. A recipe already present keeps its description, note and
    any training field the new run lacks; the new run's numbers replace the old. Returns the names merged.
    """
    recipes = results.setdefault("recipes", {})
    merged = []
    for run_file in sorted(variants.glob("*/results.json")):
        name, run = run_file.parent.name, json.loads(run_file.read_text())
        if "dev_accuracy" not in run or "accuracy" not in run:
            continue  # trained but not evaluated on both splits
        flags = run_file.parent / "recipe.txt"
        old = recipes.get(name, {})
        entry = {
            "recipe": old.get("recipe") or (describe_recipe(flags.read_text()) if flags.is_file() else name),
            "dev_accuracy": run["dev_accuracy"],
            "accuracy": run["accuracy"],
            "train": {m: {**old.get("train", {}).get(m, {}), **t} for m, t in run.get("train", {}).items()},
        }
        if old.get("note"):
            entry["note"] = old["note"]
        recipes[name] = entry
        merged.append(name)

    def dev_gap(name: str) -> float:
        dev = recipes[name]["dev_accuracy"]
        return float(dev["c2c"]["arc_easy"]["acc"] - dev["control"]["arc_easy"]["acc"])

    if recipes:
        results["chosen_recipe"] = max(recipes, key=dev_gap)
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--receiver", default="smollm2")
    p.add_argument("--sharer", default="gemma3")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("c2c-out"))
    p.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints/c2c"))
    p.add_argument("--state-dir", type=Path, default=Path("/tmp/c2c-state"))
    p.add_argument("--save-hf", type=Path, default=None, help="keep dequantised copies of both models here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--phases", default="train,eval,report")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--results", type=Path, default=None, help="merge/report phases: results.json to read")
    p.add_argument(
        "--variants",
        type=Path,
        default=None,
        help="merge phase: c2c_variants.sh's variants.tar.gz, extracted (one folder per recipe)",
    )
    p.add_argument(
        "--section",
        default="c2c",
        help="report phase: section name in docs/BENCHMARKS.md (and NAME-results in docs/C2C.md); "
        "e.g. c2c-reverse for the Gemma-3 ← SmolLM2 direction",
    )
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument("--train-budget-s", type=float, default=None, help="cap steps to fit both fusers in this")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--fuse-span", choices=("context", "all"), default="context")
    p.add_argument("--layer-map", choices=("terminal", "uniform"), default="terminal")
    p.add_argument(
        "--token-alignment",
        choices=("last", "mean", "causal"),
        default=None,
        help="default: the rule --fuse-span calls for (last for context, causal for all)",
    )
    p.add_argument(
        "--sharer-positions",
        choices=("receiver", "own"),
        default="receiver",
        help="own: the sharer keeps its positions 0..S-1 instead of the receiver tokens'",
    )
    p.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        default="plain",
        help="options: list the options in the prompt (training and evaluation alike)",
    )
    p.add_argument(
        "--mc-weight", type=float, default=0.0, help="option cross-entropy (train.OptionObjective)"
    )
    p.add_argument("--distill-weight", type=float, default=0.0, help="KL to the sharer alone's options")
    p.add_argument("--instructions", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0, help="fuser initialisation, batch order, gate noise")
    p.add_argument(
        "--split",
        choices=("test", "dev"),
        default="test",
        help="eval phase: dev → results['dev_accuracy'] (choosing among variants), no latency",
    )
    p.add_argument("--limit", type=int, default=None, help="questions per test set (debugging)")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--gen-batch", type=int, default=128)
    p.add_argument("--hint-tokens", type=int, default=24)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--latency-n", type=int, default=40, help="0: no latency probe")
    p.add_argument("--deadline-s", type=float, default=float("inf"))
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    phases = set(args.phases.split(","))
    t0 = time.perf_counter()
    if "save-hf" in phases:
        if args.save_hf is None:
            raise SystemExit("--phases save-hf needs --save-hf DIR")
        save_copy(args.receiver, args.save_hf, args.device)
    if phases & {"train", "eval"}:
        import torch

        from _report import machine_description
        from cachelm.c2c import pair

        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "results.json"
        results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
        results["meta"] = {
            "machine": f"{gpu}; {machine_description()}",
            "command": "python benchmarks/c2c_eval.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "hint_tokens": args.hint_tokens,
            "prompt_style": args.prompt_style,
            "receiver_model": model_key(args.receiver) or Path(args.receiver).name,
            "sharer_model": model_key(args.sharer) or Path(args.sharer).name,
        }
        log("loading models")
        receiver = pair.load(args.receiver, device=args.device, dtype=dtype)
        log(f"receiver loaded ({time.perf_counter() - t0:.0f}s)")
        sharer = pair.load(args.sharer, device=args.device, dtype=dtype)
        log(f"sharer loaded ({time.perf_counter() - t0:.0f}s)")
        results["meta"]["receiver_fingerprint"] = receiver.fingerprint
        results["meta"]["sharer_fingerprint"] = sharer.fingerprint
        if args.save_hf is not None:  # before session 9 the copies were named after their role
            for src, loaded in ((args.receiver, receiver), (args.sharer, sharer)):
                save_copy(src, args.save_hf, args.device, loaded)
        if "train" in phases:
            train_phase(args, receiver, sharer, results)
            write_results(args, results)
        if "eval" in phases:
            eval_phase(args, receiver, sharer, results, t0)
        write_results(args, results)
        log(f"done ({time.perf_counter() - t0:.0f}s)")
    if "fold" in phases:
        folded = fold_training(args.out)
        log(f"{args.out / 'results.json'}: training of {sorted(folded.get('train', {}))}")
    if "merge" in phases:
        if args.variants is None or args.results is None:
            raise SystemExit("--phases merge needs --variants DIR and --results FILE")
        results = json.loads(args.results.read_text())
        log(f"merged recipes {merge_recipes(results, args.variants)}; chosen: {results['chosen_recipe']}")
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    if "report" in phases:
        from _report import write_section

        src = args.results or args.out / "results.json"
        answers: dict[str, list[int]] = {}
        if args.data.is_dir():
            from cachelm.c2c.data import load_test

            answers = {s: [q.answer for q in load_test(args.data, s)] for s in SETS}
        results = json.loads(Path(src).read_text())
        md = report(results, answers)
        print(md)
        meta = results.get("meta", {})
        receiver, sharer = (MODEL_NAMES.get(m, (m, m))[0] for m in model_pair(meta))
        title = f"## C2C: {receiver} (receiver) ← {sharer} (sharer), full test sets"
        write_section(args.section, f"{title}\n\n{md}")
        write_section(
            f"{args.section}-results", md, path=Path(__file__).resolve().parent.parent / "docs" / "C2C.md"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

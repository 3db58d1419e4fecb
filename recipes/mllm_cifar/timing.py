"""How long the CIFAR-10 demonstration takes on this machine, measured on random weights of its shapes.

Prints seconds per training step, per 100 answers and per generated image (with the KV cache and without it,
side by side, and their ratio), and the resulting estimate for the whole run of ``config.json``.

    OMP_NUM_THREADS=1 .venv/bin/python recipes/mllm_cifar/timing.py --architecture dualtoken-efflite0-256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run import QUESTION, load_recipe  # noqa: E402

from dualtoken import DualTokenizer  # noqa: E402
from dualtoken.mllm import DualTokenMLLM, LLMConfig, MLLMConfig, answer, generate_images  # noqa: E402
from dualtoken.mllm.data import RenderedItem, collate  # noqa: E402
from dualtoken.mllm.text_tokenizer import train_bpe_tokenizer  # noqa: E402


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("config.json")))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--architecture", default="dualtoken-efflite0-256", help="tokenizer config (random weights)"
    )
    parser.add_argument("--work", default="/tmp/mllm_cifar_timing")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--images", type=int, default=4, help="images per generation call (cached and uncached)"
    )
    parser.add_argument("--train-only", action="store_true", help="time the training step only")
    args = parser.parse_args()
    cfg = load_recipe(args.config, args.set)

    torch.manual_seed(0)
    tokenizer = DualTokenizer.from_config(args.architecture).eval()
    if cfg.image_size is not None:
        tokenizer = tokenizer.at_resolution(cfg.image_size)
    prompt = MLLMConfig().prompt
    text = (
        prompt.user_prefix
        + QUESTION
        + prompt.user_suffix
        + prompt.assistant_prefix
        + "It is a cat."
        + "Draw a dog."
    )
    text_tokenizer = train_bpe_tokenizer(
        [text] * 20, cfg.text_vocab, Path(args.work) / "text_tokenizer", prompt
    )
    config = MLLMConfig(
        tokenizer=tokenizer.config.name,
        llm=LLMConfig(
            architecture={**cfg.llm, "vocab_size": len(text_tokenizer)},
            text_tokenizer=str(Path(args.work) / "text_tokenizer"),
        ),
        heads=cfg.heads,
        sampling=cfg.sampling,
    )
    model = DualTokenMLLM.from_config(config, visual_tokenizer=tokenizer)
    with torch.no_grad():
        codes = tokenizer.encode(torch.rand(cfg.batch_size, 3, *tokenizer.image_size) * 2 - 1)

    # a training step: half understanding, half generation samples, as in the recipe's mixed data
    items = []
    for i in range(cfg.batch_size):
        if i % 2:
            sample = model.prompt.conversation(
                [("user", f"<image>\n{QUESTION}"), ("assistant", "It is a cat.")], 1
            )
        else:
            sample = model.prompt.generation("Draw a dog.")
        items.append(RenderedItem(sample, codes.pixel[i : i + 1], codes.semantic[i : i + 1]))
    batch = collate(items, model.pad_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model.train()
    step()  # warm-up
    train_s = min(timed(step) for _ in range(args.steps))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.train_only:
        print(f"training step (batch {cfg.batch_size}): {train_s:.2f} s, {trainable:,} trainable parameters, "
              f"heads.classifier {cfg.heads.classifier}, {torch.get_num_threads()} thread(s)")
        return 0
    model.eval()
    reps = -(-cfg.eval_batch_size // cfg.batch_size)
    pixel, semantic = (c.repeat(reps, 1, 1, 1)[: cfg.eval_batch_size] for c in (codes.pixel, codes.semantic))
    answer_s = timed(lambda: answer(model, [QUESTION] * cfg.eval_batch_size, (pixel, semantic)))
    prompts = ["Draw a dog."] * args.images
    cached = timed(lambda: generate_images(model, prompts, cfg_scale=cfg.sampling.cfg_scale, decode=False))
    plain = timed(
        lambda: generate_images(model, prompts, cfg_scale=cfg.sampling.cfg_scale, decode=False, use_cache=False)
    )
    batched = timed(
        lambda: generate_images(model, ["Draw a dog."] * cfg.eval_batch_size, cfg_scale=cfg.sampling.cfg_scale)
    )

    per_image = batched / cfg.eval_batch_size
    generated = 2 * 10 * cfg.samples_per_class
    tests = cfg.test_limit or 10000
    print(
        f"sequence {tuple(batch.input_ids.shape)}, {trainable:,} trainable parameters, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(f"training step (batch {cfg.batch_size}): {train_s:.2f} s")
    print(f"answers: {answer_s / cfg.eval_batch_size * 100:.2f} s per 100 images")
    print(
        f"generation of {args.images} images with guidance: KV cache {cached:.1f} s, without {plain:.1f} s, "
        f"ratio {plain / cached:.1f}x; {per_image:.2f} s per image in batches of {cfg.eval_batch_size}"
    )
    print(
        f"estimate: training {len(cfg.modes)} x {cfg.steps} steps = {len(cfg.modes) * cfg.steps * train_s / 60:.0f} min;"
        f" answers {len(cfg.modes)} x {tests} = {len(cfg.modes) * tests * answer_s / cfg.eval_batch_size / 60:.0f} min;"
        f" generation {generated} images = {generated * per_image / 60:.0f} min"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

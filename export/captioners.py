"""BLIP-2 captions through transformers (`Blip2ForConditionalGeneration` + `Blip2Processor`), loaded from a
folder the user gives, with the research code's decoding settings: greedy, at most 32 new tokens. Batched,
on the GPU when there is one. `write_tiny_blip2` writes a tiny random BLIP-2 in transformers' own folder
format for tests (its captions are meaningless)."""

from pathlib import Path
from typing import List

import numpy as np
import torch

from perco.engine.errors import ModelError
from perco.export.hf import quiet_transformers

MAX_NEW_TOKENS = 32  # the research code's max_number_tokens


class Blip2Captioner:
    name = "blip2"

    def __init__(self, folder, device=None, batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS):
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ModelError(f"BLIP-2 folder {folder} has no config.json (a transformers Blip2ForConditionalGeneration "
                             f"folder, e.g. Salesforce/blip2-opt-2.7b-coco saved with save_pretrained)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            with quiet_transformers():
                self.processor = Blip2Processor.from_pretrained(str(folder))
                self.model = Blip2ForConditionalGeneration.from_pretrained(
                    str(folder), dtype=torch.float16 if self.device == "cuda" else torch.float32).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load BLIP-2 from {folder}: {str(exc).splitlines()[0]}") from None
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    @torch.inference_mode()
    def __call__(self, images: List[np.ndarray]) -> List[str]:
        captions = []
        for start in range(0, len(images), self.batch_size):
            batch = [np.asarray(image, dtype=np.uint8) for image in images[start : start + self.batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device, self.model.dtype)
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            captions += [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return captions


def write_tiny_blip2(folder, seed: int = 0) -> Path:
    """A tiny random BLIP-2 (ViT 32 px, one Q-Former and one OPT layer, a small byte-level BPE) in transformers'
    folder format: loadable by `Blip2Captioner`, its captions meaningless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil, PreTrainedTokenizerFast,
    )

    from perco.export.models.tokenizer import _WORDS

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(_WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    text = dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=len(tokenizer), word_embed_proj_dim=32, max_position_embeddings=128,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=text, num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    folder = Path(folder)
    Blip2ForConditionalGeneration(config).save_pretrained(str(folder))
    Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   num_query_tokens=4).save_pretrained(str(folder))
    return folder

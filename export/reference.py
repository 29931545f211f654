"""The torch reference backend: eager modules, float32, the ground truth for every other backend."""

from typing import Dict

import numpy as np
import torch

from perco.engine.errors import BackendError
from perco.engine.graphs import GRAPHS
from perco.engine.model import ModelInfo
from perco.export.models.perco_sd import load_model


class TorchBackend:
    name = "torch"

    def __init__(self, model: ModelInfo):
        self.model = model
        self.modules = load_model(model)
        self.scaling_factor = model.scaling_factor
        self._graphs = {
            "text_encoder": self._text_encoder,
            "vae_encoder": self._vae_encoder,
            "hyper_encoder": self._hyper_encoder,
            "local_features": self._local_features,
            "denoiser": self._denoiser,
            "vae_decoder": self._vae_decoder,
        }
        assert set(self._graphs) == set(GRAPHS), "backend must implement exactly the graph contract"

    @torch.inference_mode()
    def run(self, graph: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if graph not in self._graphs:
            raise BackendError(f"unknown graph {graph!r}")
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
        outputs = self._graphs[graph](**tensors)
        return {k: v.numpy() for k, v in outputs.items()}

    def _text_encoder(self, input_ids):
        return {"text_embeddings": self.modules["text_encoder"](input_ids).last_hidden_state}

    def _vae_encoder(self, image):
        mean = self.modules["vae"].encode(image).latent_dist.mean  # deterministic: the posterior mean
        return {"latent": mean * self.scaling_factor}

    def _hyper_encoder(self, latent):
        return {"indices": self.modules["hyper_enc"](latent)}

    def _local_features(self, indices):
        return {"local_features": self.modules["hyper_enc"].local_features(indices)}

    def _denoiser(self, sample, timestep, text_embeddings, local_features):
        out = self.modules["unet"](sample, timestep, text_embeddings, local_features, return_dict=False)[0]
        return {"model_output": out}

    def _vae_decoder(self, latent):
        return {"image": self.modules["vae"].decode(latent / self.scaling_factor).sample}

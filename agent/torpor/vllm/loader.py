"""`--load-format torpor`: vLLM's weights live in torpord, as an image.

On the first start of an engine configuration (a miss) the checkpoint is
loaded the usual way (vLLM's DefaultModelLoader) and processed (fused,
sharded, repacked, quantized); the final tensors are published into the
daemon, the model's parameters are switched onto the published, sealed
image, and the engine's own copy is freed. Every later start with the same
fingerprint (see torpor.vllm.fingerprint), in this process or another, is a
hit: the model is built on `meta`, the image's tensors are put in (nothing
is read from the checkpoint, nothing copied), and vLLM's post-processing
runs in its pre-processed mode (it only rebuilds kernels' Python state).

The attachment stays on the model (`model.torpor_image`), so the image is
mapped as long as the model lives; its forward, compute_logits and
embed_input_ids run inside the agent's `use()` gate (torpor.vllm.gate), so
the daemon can put the image to sleep and wake it while vLLM serves. On a
GPU with `enable_sleep_mode`, vLLM's own sleep and wake go through the
daemon too (torpor.vllm.sleep).

This module imports vLLM: only `torpor.vllm.register` imports it, in a vLLM
process.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from typing import Any

import torch
from torch import nn
from vllm.config import LoadConfig, ModelConfig, VllmConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import (
    initialize_model,
    process_weights_after_loading,
)
from vllm.model_executor.utils import weights_already_processed
from vllm.utils.torch_utils import set_default_torch_dtype

from torpor.agent.attach import AttachedModel
from torpor.agent.publish import groups_of
from torpor.client import Client
from torpor.vllm import fingerprint, gate, images, sleep, weights
from torpor.vllm.options import LoaderOptions

__all__ = ["TorporModelLoader"]

# Under vLLM's logger, so its handler shows these lines with its own.
log = logging.getLogger("vllm.torpor")


class TorporModelLoader(BaseModelLoader):  # type: ignore[misc]  # (vLLM: untyped here)
    """vLLM's model loader for `load_format="torpor"` (see the module's doc).

    Cheap to make (vLLM makes several, in each process): no connection and
    no I/O until a model is loaded."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = LoaderOptions.parse(load_config.model_loader_extra_config)
        # The checkpoint path, on a miss: vLLM's own loader, which knows no torpor keys.
        self.inner = DefaultModelLoader(
            dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        )

    # -- what vLLM asks ----------------------------------------------------------------

    def download_model(self, model_config: ModelConfig) -> None:
        self.inner.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        raise NotImplementedError(
            "load_format='torpor' serves sealed, read-only images: weights cannot be loaded"
            " into a model in place (reload with load_format='auto' to change them)"
        )

    def get_external_weight_memory(self, vllm_config: VllmConfig) -> int:
        """The image's bytes, which the daemon holds outside this process, on a
        hit (the GPU worker leaves them out of its budget); 0 otherwise."""
        try:
            described = self._describe(vllm_config, vllm_config.model_config)
            with self._client() as client:
                return images.image_bytes(client, fingerprint.fingerprint_of(described))
        except Exception as err:  # (the load says what is wrong, clearly)
            log.warning("torpor: cannot tell the image's size yet: %s", err)
            return 0

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        # The worker's sleep mode (GPU) goes through the daemon: torpor.vllm.sleep.
        sleep.select(vllm_config.model_config)
        described = self._describe(vllm_config, model_config)
        fp = fingerprint.fingerprint_of(described)
        model_id = fingerprint.model_id_of(described, fp, self.options.model_id)
        rank = described["sharding"]["tp"][1]
        device = torch.device(self.load_config.device or vllm_config.device_config.device)
        client = self._client()
        try:
            attached = images.attach_image(client, fp, wait_s=self.options.wait_s, rank=rank)
            if attached is not None:
                log.info("torpor: image hit %s (%s)", attached.model_id, fp)
                model = self._build_from(attached, vllm_config, model_config, prefix, device)
            else:
                log.info("torpor: image miss (%s): loading, then publishing %s", fp, model_id)
                model, attached = self._load_and_publish(
                    vllm_config, model_config, prefix, device, model_id, fp, rank, client
                )
        except BaseException:
            client.close()
            raise
        gate.guard(model, gate.Image(attached, client, fp, self.options.wait_s))
        return model.eval()

    # -- the two paths ---------------------------------------------------------------

    def _build_from(
        self,
        attached: AttachedModel,
        vllm_config: VllmConfig,
        model_config: ModelConfig,
        prefix: str,
        device: torch.device,
    ) -> nn.Module:
        """A hit: build on meta and put the image's tensors in."""
        try:
            with set_default_torch_dtype(model_config.dtype):
                with torch.device("meta"):
                    model: nn.Module = initialize_model(
                        vllm_config=vllm_config, model_config=model_config, prefix=prefix
                    )
                weights.check_pre_processable(model)
                weights.install(model, attached.state_dict())
                weights.unpacked_cpu_gemm(model, processed=False)
                with weights_already_processed():
                    process_weights_after_loading(model, model_config, device)
                weights.unpacked_cpu_gemm(model, processed=True)
            left = weights.on_meta(model)
            if left:
                raise ValueError(
                    f"load_format='torpor': the image {attached.model_id!r} lacks tensors of this"
                    f" model ({left[:5]}); unload it and start again"
                )
        except BaseException:
            attached.close()
            raise
        return model

    def _load_and_publish(
        self,
        vllm_config: VllmConfig,
        model_config: ModelConfig,
        prefix: str,
        device: torch.device,
        model_id: str,
        fp: str,
        rank: int,
        client: Client,
    ) -> tuple[nn.Module, AttachedModel]:
        """A miss: load and process as vLLM does, publish, switch onto the image."""
        with set_default_torch_dtype(model_config.dtype):
            with device:
                model = initialize_model(
                    vllm_config=vllm_config, model_config=model_config, prefix=prefix
                )
            weights.check_pre_processable(model)
            self.inner.load_weights(model, model_config)
            gc.collect()
            weights.unpacked_cpu_gemm(model, processed=False)
            process_weights_after_loading(model, model_config, device)
            weights.unpacked_cpu_gemm(model, processed=True)
        final = weights.tensors_of(model)
        attached = images.publish_or_join(
            client,
            model_id,
            fp,
            groups_of(final),
            wait_s=self.options.wait_s,
            rank=rank,
        )
        try:
            weights.switch(model, attached.state_dict())
        except BaseException:
            attached.close()
            raise
        del final
        gc.collect()
        if device.type != "cpu":
            torch.accelerator.empty_cache()
        return model, attached

    # -- helpers ---------------------------------------------------------------------

    def _client(self) -> Client:
        return Client(socket=self.options.socket) if self.options.socket else Client()

    def _describe(self, vllm_config: VllmConfig, model_config: ModelConfig) -> dict[str, Any]:
        return fingerprint.describe(vllm_config, model_config, self._directory(model_config))

    def _directory(self, model_config: ModelConfig) -> str:
        """The checkpoint's local directory (a Hub id: its cached snapshot,
        downloaded first if need be)."""
        model = str(model_config.model)
        if os.path.isdir(model):
            return model
        from huggingface_hub import snapshot_download

        try:
            return str(
                snapshot_download(model, revision=model_config.revision, local_files_only=True)
            )
        except Exception:
            self.inner.download_model(model_config)
            return str(
                snapshot_download(model, revision=model_config.revision, local_files_only=True)
            )

"""A latent SDXL teacher for distilling pixel-space SDXL's patch encoder and decoder (train_pixel_sdxl.py, stage 1)."""

from __future__ import annotations

import torch


class _Captured(Exception):
    """Stops the teacher's forward once the wanted features are captured."""


class SDXLTeacher:
    """A latent SDXL U-Net and its VAE (a diffusers SDXL folder: `unet/`, `vae/`); returns the features at the pixel
    body's entry or exit level."""

    def __init__(self, path: str, first_level: int, device):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False).eval().to(device)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae").requires_grad_(False).eval().to(device)
        # SDXL's training schedule (scaled-linear betas), for the noisy teacher input.
        ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        self.alphas_cumprod = ddpm.alphas_cumprod.to(device)
        levels = len(self.unet.config.block_out_channels)
        self.entry = self.unet.down_blocks[first_level - 1]
        self.exit = self.unet.up_blocks[levels - 1 - first_level].upsamplers[0]

    @torch.no_grad()
    def features(self, which: str, pixels, sigmas, context, added, noisy: bool, generator) -> torch.Tensor:
        posterior = self.vae.encode(pixels).latent_dist
        sample = torch.randn(posterior.mean.shape, generator=generator).to(pixels.device)
        latents = (posterior.mean + posterior.std * sample) * self.vae.config.scaling_factor
        timesteps = sigmas * 999
        if noisy:
            alpha = self.alphas_cumprod[timesteps.round().long()].view(-1, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            latents = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        captured = {}

        def at_entry(module, args, output):
            captured["features"] = output[0]
            raise _Captured

        def at_exit(module, args, kwargs):
            captured["features"] = kwargs.get("hidden_states", args[0] if args else None)
            raise _Captured

        handle = (
            self.entry.register_forward_hook(at_entry)
            if which == "entry"
            else self.exit.register_forward_pre_hook(at_exit, with_kwargs=True)
        )
        try:
            self.unet(latents, timesteps, context, added_cond_kwargs=added)
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured["features"]

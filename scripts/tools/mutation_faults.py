"""The deliberate faults of scripts/tools/mutation_check.py: literal substitutions and the tests that must catch them.

Keep each ``old`` unique in its file; when the code moves on, the check reports the fault STALE.
"""

from __future__ import annotations

CORE = "tests/core/test_megasr_core.py"
NODE_PATH = "tests/nodes/test_sampling_path.py"
BRANCHES = "tests/nodes/test_control_branches.py"
X4 = "tests/nodes/test_workflow_megasr.py::test_x4_output_is_the_colour_fixed_decode_at_exactly_4x_and_follows_the_seed"
SWAP = (
    "tests/nodes/test_workflow_megasr.py::test_swapped_guidance_maps_reach_the_model_in_their_slots_at_the_output_size"
)
CLIP_CROP = (
    "tests/nodes/test_dage_nodes.py::test_clip_semantics_crop_none_equals_what_training_computes_for_a_non_square_lr"
)
DTYPES = "tests/nodes/test_node_vs_training.py::test_unet_and_megasr_in_different_dtypes_give_the_fp32_prediction"
TRAIN_VS_NODES = "tests/nodes/test_node_vs_training.py::test_training_hint_and_maps_equal_the_nodes_for_the_same_lr"
TRAIN_NOISE = (
    "tests/training/test_training_inputs.py::test_training_noise_is_the_ddpm_schedule_at_the_timestep_the_model_is_told"
)
DAGE_INPUT = "tests/training/test_training_inputs.py::test_dage_student_is_trained_on_what_the_node_feeds_it"
LEVELS = "tests/core/test_level_strengths.py"
MEMORY_OPTIONS = "tests/training/test_training_memory_options.py"
CKPT_GRADS = f"{MEMORY_OPTIONS}::test_gradient_checkpointing_gives_the_same_gradients"
EMA = f"{MEMORY_OPTIONS}::test_ema_follows_its_recurrence_and_a_resume_restores_it_exactly"

FAULTS: list[dict] = [
    dict(
        name="colorfix_no_clamp",
        file="megasr/colorfix.py",
        old="    return out.clamp(0.0, 1.0)",
        new="    return out",
        tests=("tests/core/test_colorfix.py",),
        what="colour fix result no longer clamped to 0..1",
    ),
    dict(
        name="wavelet_kernel",
        file="megasr/colorfix.py",
        old="[2.0, 4.0, 2.0]",
        new="[2.0, 5.0, 2.0]",
        tests=("tests/core/test_colorfix.py",),
        what="wrong a-trous blur kernel",
    ),
    dict(
        name="silog_lambda",
        file="megasr/dage/depth.py",
        old="lambd: float = 0.5",
        new="lambd: float = 1.0",
        tests=("tests/core/test_dage_loss_values.py",),
        what="SILog with the wrong variance weight",
    ),
    dict(
        name="dage_output_weight",
        file="megasr/dage/__init__.py",
        old='{"loss": feat + output_weight * out,',
        new='{"loss": feat + out,',
        tests=("tests/core/test_dage_loss_values.py",),
        what="DAGE output-loss weight ignored (Eq. 6)",
    ),
    dict(
        name="cism_gate_skipped",
        file="megasr/cism.py",
        old="return (strength * cast_like(self.gate, image_out)) * self.proj(image_out)",
        new="return strength * self.proj(image_out)",
        tests=(CORE,),
        what="CISM² per-block gate skipped",
    ),
    dict(
        name="saft_no_identity",
        file="megasr/msgam.py",
        old="self.norm(x) * (1 + gamma) + beta",
        new="self.norm(x) * gamma + beta",
        tests=(CORE,),
        what="SAFT without the (1 + gamma) identity (Eq. 9)",
    ),
    dict(
        name="timestep_mapping",
        file="nodes/runtime/control.py",
        old="timestep = self.model_sampling_current.timestep(t).to(dtype)",
        new="timestep = t.to(dtype)",
        tests=("tests/nodes/test_node_vs_training.py",),
        what="ControlNet gets sigma instead of the DDPM timestep",
    ),
    dict(
        name="hint_input_scaling",
        file="nodes/runtime/control.py",
        old="x_in = self.model_sampling_current.calculate_input(t, x_noisy).to(dtype)",
        new="x_in = x_noisy.to(dtype)",
        tests=("tests/nodes/test_node_vs_training.py",),
        what="ControlNet input not scaled by 1/sqrt(sigma^2+1)",
    ),
    dict(
        name="unet_trains",
        file="training/base_models.py",
        old="    return model.eval().requires_grad_(False)",
        new="    return model.eval()",
        tests=("tests/training/test_training_megasr.py",),
        what="the frozen SD-2 U-Net / VAE / text encoder get gradients",
    ),
    dict(
        name="lre_bilinear",
        file="nodes/sampler.py",
        old='return to_canvas(lr, Canvas.for_output(out_h, out_w), "bicubic").clamp(0, 1), (out_h, out_w)',
        new='return to_canvas(lr, Canvas.for_output(out_h, out_w), "bilinear").clamp(0, 1), (out_h, out_w)',
        tests=(NODE_PATH,),
        what="LRE latent from a bilinear instead of bicubic upscale",
    ),
    dict(
        name="hint_shifted_one_pixel",
        file="nodes/runtime/control.py",
        old='out = {"hint": to_canvas(self.cond_hint_original.float(), self.canvas, "bicubic").clamp(0, 1)}',
        new='out = {"hint": to_canvas(self.cond_hint_original.float(), self.canvas, "bicubic").clamp(0, 1).roll(1, -1)}',
        tests=("tests/nodes/test_tiled_sampling.py::test_hint_and_maps_sit_on_the_latent_source_to_the_pixel",),
        what="the LR hint shifted right by one pixel against the VAE's source",
    ),
    dict(
        name="hed_depth_swapped",
        file="nodes/runtime/control.py",
        old='maps.get("hed"),\n                maps.get("depth"),',
        new='maps.get("depth"),\n                maps.get("hed"),',
        tests=("tests/nodes/test_node_vs_training.py",),
        what="HED and depth maps fed into each other's MS-GAM slots",
    ),
    dict(
        name="overlap_averaged",
        file="megasr/tiling.py",
        old="wgt = self._weight(t).to(self.acc.dtype)",
        new="wgt = torch.ones((t.y1 - t.y0, t.x1 - t.x0), dtype=self.acc.dtype, device=self.acc.device)",
        tests=("tests/core/test_tiling.py",),
        what="tile predictions averaged in the overlap instead of ramp-weighted",
    ),
    dict(
        name="percent_range_ignored",
        file="nodes/msgam.py",
        old=".set_cond_hint(hint, strength, (start_percent, end_percent))",
        new=".set_cond_hint(hint, strength, (0.0, 1.0))",
        tests=(BRANCHES,),
        what="Guidance Fusion start/end percent ignored",
    ),
    dict(
        name="percent_range_reversed",
        file="nodes/runtime/control.py",
        old="not (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1])",
        new="not (t[0] < self.timestep_range[0] or t[0] > self.timestep_range[1])",
        tests=(BRANCHES,),
        what="start/end percent window tested the wrong way round",
    ),
    dict(
        name="cism_off_outside_range",
        file="nodes/runtime/control.py",
        old="ctx = self._context(model, binding, tokens, None, latent_hw, device, dtype)",
        new="ctx = self._context(model, binding, None, None, latent_hw, device, dtype)",
        tests=(BRANCHES,),
        what="CISM² switched off outside start/end percent (documented: it stays on)",
    ),
    dict(
        # (Replacing the negative's maps alone is an equivalent mutant: the shared control is cached.)
        name="negative_own_control",
        file="nodes/msgam.py",
        old='negative_only = branch == "negative" and not shared',
        new='negative_only = branch == "negative"',
        tests=(BRANCHES,),
        what="the negative branch gets its own MegaSR control by default (cond/uncond no longer batched)",
    ),
    dict(
        name="clip_node_crop_center",
        file="nodes/semantics.py",
        old='out = cv.encode_image(pixels, crop=crop == "center")',
        new="out = cv.encode_image(pixels, crop=True)",
        tests=(CLIP_CROP,),
        what='the CLIP semantics node centre-crops even with crop="none" (training squashes the whole image)',
    ),
    dict(
        name="training_clip_crop_default",
        file="training/config.py",
        old="    clip_crop: bool = False",
        new="    clip_crop: bool = True",
        tests=(CLIP_CROP,),
        what="training centre-crops the LR for CLIP by default while the node's default is crop none",
    ),
    dict(
        name="hed_depth_inputs_swapped",
        file="nodes/msgam.py",
        old='for name, image in (("hed", hed), ("depth", depth), ("seg", seg)):',
        new='for name, image in (("hed", depth), ("depth", hed), ("seg", seg)):',
        tests=(SWAP,),
        what="Guidance Fusion's HED and depth inputs stored in each other's slots (the node path, not training)",
    ),
    dict(
        name="map_resize_bicubic",
        file="nodes/runtime/control.py",
        old='out[name] = to_canvas(m.float(), self.canvas, "nearest-exact" if name == "seg" else "bilinear")',
        new='out[name] = to_canvas(m.float(), self.canvas, "nearest-exact" if name == "seg" else "bicubic")',
        tests=(SWAP,),
        what="HED / depth maps resized to the output with another filter than training's bilinear",
    ),
    dict(
        name="output_cropped_bottom_right",
        file="nodes/sampler.py",
        old="decoded = decoded.reshape(-1, *decoded.shape[-3:])[:, :out_h, :out_w, :3].float()",
        new="decoded = decoded.reshape(-1, *decoded.shape[-3:])[:, -out_h:, -out_w:, :3].float()",
        tests=(X4,),
        what="the decoded canvas cropped at the bottom right (the padding kept, the image shifted)",
    ),
    dict(
        name="seed_ignored",
        file="nodes/sampler.py",
        old="noise = comfy.sample.prepare_noise(latent, seed, None)",
        new="noise = comfy.sample.prepare_noise(latent, 0, None)",
        tests=(X4,),
        what="the MegaSR Sampler's seed ignored",
    ),
    dict(
        name="unet_attention_cast_dropped",
        file="nodes/runtime/control.py",
        old="return self.attention.attend(n.to(self.dtype), k, v).to(n.dtype)",
        new="return self.attention.attend(n, k, v)",
        tests=(DTYPES,),
        what="the ControlNet's image path calls the U-Net's attention in the MegaSR dtype (U-Net in another dtype)",
    ),
    # issue 27: what training feeds the model is what the nodes feed it
    dict(
        name="training_maps_flipped",
        file="training/guidance.py",
        old="        out[kind] = m\n    return out",
        new="        out[kind] = m.flip(-1)\n    return out",
        tests=(TRAIN_VS_NODES,),
        what="training's maps flipped left-right in maps_to_output_size",
    ),
    dict(
        name="training_schedule_t_plus_1",
        file="training/stage_megasr.py",
        old="a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)",
        new="a = self.alphas_cumprod[(timesteps + 1).clamp(max=self.num_timesteps - 1)].view(-1, 1, 1, 1)",
        tests=(TRAIN_NOISE,),
        what="training noises at t+1 of the schedule while the model is told t",
    ),
    dict(
        name="level_strength_mirrored",
        file="megasr/extension.py",
        old="return self.cism_strength * (s[min(level, len(s) - 1)] if s else 1.0)",
        new="return self.cism_strength * (s[len(s) - 1 - min(level, len(s) - 1)] if s else 1.0)",
        tests=(LEVELS,),
        what="per-level CISM² strength read for the mirrored level",
    ),
    dict(
        name="up_block_level_mirrored",
        file="megasr/blocks.py",
        old="rev_channels[i], n - 1 - i))",
        new="rev_channels[i], i))",
        tests=(LEVELS,),
        what="the up path's blocks given the mirrored level (their CISM² strength is another level's)",
    ),
    dict(
        name="training_hint_bilinear",
        file="training/data.py",
        old='mode="bicubic", align_corners=False).clamp_(0, 1)',
        new='mode="bilinear", align_corners=False).clamp_(0, 1)',
        tests=(TRAIN_VS_NODES,),
        what="training's ControlNet hint resized bilinearly while the nodes feed bicubic",
    ),
    dict(
        name="dage_student_on_lr_up",
        file="training/dage.py",
        old="    return batch.lr\n",
        new="    return batch.lr_up\n",
        tests=(DAGE_INPUT,),
        what="the DAGE student fine-tuned on the bicubic lr_up while the nodes feed it the raw LR",
    ),
    dict(
        name="guidance_batch_interleaved",
        file="megasr/layers.py",
        old="    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))",
        new="    return x.repeat_interleave(batch // x.shape[0], 0)",
        tests=("tests/nodes/test_workflow_megasr.py::test_batch_item_0_is_the_single_image_run",),
        what="guidance tiled to the cond/uncond batch item-wise ([a, a, b, b]): batch items get each other's maps",
    ),
    dict(
        name="checkpointed_block_detached",
        file="megasr/adapter_diffusers.py",
        old="return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)",
        new="return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False).detach()",
        tests=(CKPT_GRADS,),
        what="gradient checkpointing: a checkpointed block's output detached (no gradient reaches what is before it)",
    ),
    dict(
        name="checkpoint_rerun_without_guidance",
        file="megasr/adapter_diffusers.py",
        old="again = ctx if first or ctx is None else dataclasses.replace(ctx, _cache=dict(cache))",
        new="again = ctx if first else None",
        tests=(CKPT_GRADS,),
        what="gradient checkpointing: the block re-run in backward without its guidance context",
    ),
    dict(
        name="ema_decay_swapped",
        file="training/ema.py",
        old="torch._foreach_lerp_(shadows, current, 1.0 - self.decay)",
        new="torch._foreach_lerp_(shadows, current, self.decay)",
        tests=(EMA,),
        what="EMA update as (1 - d) * shadow + d * param",
    ),
]

"""Every speed-up of vera-cli, behind one seam; the plain path is the model and the adapters as written.

- `forward(model)` / `features(model)`: the ConvNet's convolutional prefix as one compiled CPU kernel
  (convnet_features.c), else lane-padded channels-last convolutions (convnet.py); adapted layers through
  W0 + delta W where that costs fewer multiply-adds (weight_path.py).
- `augmented`: a batch gathered, cropped, flipped and normalised in one compiled pass (augment.c), and
  `predict_logits` / `view_outputs` on such batches.
- `uses_bf16` / `bf16_autocast`: mixed precision where the hardware multiplies bf16 natively, with attention
  on the CPU as explicit products, where torch's fused kernel is slow in bf16 (mixed_precision.py).
- `build_pipeline`: adapt's feature cache, a frozen prefix (and the first adapted layer's frozen part)
  computed once, its outputs shared by a comparison's rows over one base (`SharedViews`; feature_cache.py);
  on it the ConvNet's VeRA-adapted classifier trains as one autograd node (convnet_classifier.py), on the
  CPU through one compiled kernel call each way (linear_chain.c).

The kernels compile on first use into a per-user cache (build.py); without a compiler, on another
processor, or with VERA_CLI_KERNELS=off, torch's operators run instead; a cached library is checked before it
is loaded, and one that fails is built again. `compute_path()` says which path ran, for each run's record.
Every path computes the plain path's function to float rounding, and the tests hold each one to it.
"""

from vera_cli.fast.augment import augmented
from vera_cli.fast.build import compute_path, forget_use
from vera_cli.fast.feature_cache import BatchSource, Pipeline, SharedViews, build_pipeline
from vera_cli.fast.forward import Forward, features, forward, predict_logits, view_outputs
from vera_cli.fast.mixed_precision import bf16_autocast, uses_bf16

__all__ = ["BatchSource", "Forward", "Pipeline", "SharedViews", "augmented", "bf16_autocast", "build_pipeline",
           "compute_path", "features", "forget_use", "forward", "predict_logits", "uses_bf16", "view_outputs"]

# The paper's central ablation at small scale: the --set overrides of each variant on top of default.json.
# Sourced by train_all.sh. Every variant gets the same data, steps and optimiser.
declare -A VARIANTS=(
  [a_single_deep_both]='--set model_overrides=["pixel_quantizer=null","pixel_layer=11"]'
  [b_single_deep_recon]='--set model_overrides=["pixel_quantizer=null","pixel_layer=11"] --set loss.semantic_weight=0 --set teacher=none'
  [c_single_shallow_recon]='--set model_overrides=["pixel_quantizer=null","pixel_layer=5","semantic_layer=5"] --set loss.semantic_weight=0 --set teacher=none'
  [d_dualtoken]=''
)

"""ΔW analysis: SVD toolkit, subspace similarity, intruder dimensions, and reading PEFT adapters.

Float64 NumPy on the CPU, whatever backend trained the model (arrays are copied with
``minilora.backend.to_numpy``). Pure functions; nothing here prints, writes results or plots.

* :mod:`.svd` spectrum, energy, effective / stable rank, Eckart-Young truncation
* :mod:`.lowrank` the SVD of s·B·A from its r × r core (no d × d matrix)
* :mod:`.randomized` randomized truncated SVD (Halko et al.) for the top k of a large W
* :mod:`.subspace` principal angles, the LoRA paper's φ and its random baseline, amplification
* :mod:`.intruders` intruder dimensions and scaling chosen singular directions
* :mod:`.exact_intruders` the exact intruder count of W_0 + s·B·A from W_0's cached SVD
* :mod:`.module_paths` module paths: natural order, layer, type, short labels
* :mod:`.safetensors_lazy` lazy safetensors reading (bf16 included) and base-weight lookup
* :mod:`.peft_files` any PEFT LoRA adapter directory, one module at a time
* :mod:`.adapter_analysis` one record per module of an adapter (with another adapter / base)

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from minilora.analysis.adapter_analysis import (
                                   INTRUDER_MODES,
                                   SUBSPACES,
                                   BasePlan,
                                   ModuleRecord,
                                   analyze_adapter,
                                   analyze_lora_module,
                                   base_info,
                                   dora_weight,
                                   plan_base,
                                   read_base,
                                   subspace_basis,
)
from minilora.analysis.exact_intruders import (
                                   BaseSvd,
                                   BaseSvdCache,
                                   MemoryCache,
                                   base_svd,
                                   default_cache_dir,
                                   intruders_lowrank,
                                   tensor_hash,
)
from minilora.analysis.intruders import (
                                   Intruders,
                                   intruder_dimensions,
                                   intruders_from_weights,
                                   max_cosines,
                                   perturbed_similarities,
                                   scale_singular_directions,
)
from minilora.analysis.module_paths import (
                                   layer_index,
                                   module_type,
                                   natural_key,
                                   natural_sorted,
                                   type_labels,
)
from minilora.analysis.lowrank import (
                                   lowrank_frobenius_norm,
                                   lowrank_singular_values,
                                   lowrank_svd,
)
from minilora.analysis.peft_files import (
                                   LoraModule,
                                   PeftAdapter,
                                   SkippedTensor,
                                   lora_scaling,
                                   match_pattern,
                                   module_rank_alpha,
                                   read_peft_adapter,
)
from minilora.analysis.randomized import randomized_svd
from minilora.analysis.safetensors_lazy import (
                                   AdapterFileError,
                                   BaseWeights,
                                   is_lfs_pointer,
                                   SafetensorsFile,
                                   bf16_to_float32,
                                   float32_to_bf16,
                                   write_safetensors,
)
from minilora.analysis.subspace import (
                                   amplification_factor,
                                   orthonormal_basis,
                                   phi_grid,
                                   phi_null_quantiles,
                                   phi_random_expectation,
                                   phi_random_sampled,
                                   principal_angles,
                                   project_onto,
                                   random_orthonormal,
                                   random_projection_expectation,
                                   subspace_similarity,
)
from minilora.analysis.svd import (
                                   SVD,
                                   AnalysisError,
                                   Truncation,
                                   as_float64,
                                   effective_rank,
                                   energy_captured,
                                   energy_curve,
                                   knee_rank,
                                   numerical_rank,
                                   rank_for_energy,
                                   singular_values,
                                   stable_rank,
                                   svd,
                                   truncate,
                                   truncation_errors,
)

__all__ = [
    "SVD", "AnalysisError", "Truncation", "as_float64", "effective_rank", "energy_captured",
    "energy_curve", "knee_rank", "numerical_rank", "rank_for_energy", "singular_values", "stable_rank", "svd",
    "truncate", "truncation_errors",
    "lowrank_frobenius_norm", "lowrank_singular_values", "lowrank_svd",
    "randomized_svd",
    "amplification_factor", "orthonormal_basis", "phi_grid", "phi_null_quantiles",
    "phi_random_expectation",
    "phi_random_sampled", "principal_angles", "project_onto", "random_orthonormal",
    "random_projection_expectation", "subspace_similarity",
    "Intruders", "intruder_dimensions", "intruders_from_weights", "max_cosines",
    "perturbed_similarities", "scale_singular_directions",
    "AdapterFileError", "BaseWeights", "SafetensorsFile", "is_lfs_pointer", "bf16_to_float32", "float32_to_bf16",
    "write_safetensors",
    "LoraModule", "PeftAdapter", "SkippedTensor", "lora_scaling", "match_pattern", "module_rank_alpha",
    "read_peft_adapter",
    "INTRUDER_MODES", "SUBSPACES", "BasePlan", "ModuleRecord", "analyze_adapter",
    "analyze_lora_module", "base_info", "dora_weight", "plan_base", "read_base", "subspace_basis",
    "BaseSvd", "BaseSvdCache", "MemoryCache", "base_svd", "default_cache_dir",
    "intruders_lowrank", "tensor_hash",
    "layer_index", "module_type", "natural_key", "natural_sorted", "type_labels",
]

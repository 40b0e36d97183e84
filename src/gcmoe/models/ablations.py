"""The GC-MoE ablations of the paper's Table 2: registry names, display names, and component switches.

Kept free of torch so tables and the command line can read it without loading models.
"""

from __future__ import annotations

# name -> (display name, switches); rows in the paper's order, the full model last
ABLATIONS: dict[str, tuple[str, dict[str, bool]]] = {
    "gcmoe_no_moe_cap_c2ca": ("Ours w/o CS-MoE, CAP, C2CA", dict(moe=False, cap=False, c2ca=False)),
    "gcmoe_no_cap_c2ca": ("Ours w/o CAP, C2CA", dict(moe=True, cap=False, c2ca=False)),
    "gcmoe_no_c2ca": ("Ours w/o C2CA", dict(moe=True, cap=True, c2ca=False)),
    "gcmoe": ("GC-MoE", dict(moe=True, cap=True, c2ca=True)),
}
ABLATION_DISPLAY_NAMES = [display for display, _ in ABLATIONS.values()]

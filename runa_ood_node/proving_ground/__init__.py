"""The proving ground (issue 22): a seeded procedural driving-like world whose ground truth is known
by construction (``world``), where a small CLIP is trained (``clip_train``) and every OOD method is
measured end to end. numpy + OpenCV + torch only, no ROS. Tool: ``runa-ood proving-ground``."""

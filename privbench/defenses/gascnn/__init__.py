"""GASCNN: teacher ResNet, data-free synthesis, ResNet-to-SNN conversion, spike learning."""

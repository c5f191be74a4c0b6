"""The networks: the class-conditional diffusers UNet and the classifiers (``models``),
and how a classifier is trained and applied (``classifier``). No BatchNorm in anything
trained with DP."""

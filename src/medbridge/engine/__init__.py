"""Engine: configs, frozen-activation cache, training, metrics, evaluation and run outputs."""

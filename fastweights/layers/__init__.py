"""nn.Modules, one per mechanism: ``attention`` (full and sliding-window attention, TokenLayout),
``inplace_ttt`` (InPlaceTTTMLP), ``lact`` (LaCTLayer), ``fwl`` (FastWeightLayer), ``fast_weights_rnn``
(Ba et al.'s fast-weights RNN) and ``plastic`` (PlasticLinear, PlasticFFN); import them from their modules."""

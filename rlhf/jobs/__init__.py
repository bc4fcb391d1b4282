"""The jobs: ``sft`` (and, built on the same pieces, ``rm``, ``dpo`` and ``ppo``)."""

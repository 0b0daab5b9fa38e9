"""Long-running operations (AIP-151): reads and cancellation (``service``), and the runner
that carries them forward a step at a time on any replica (``runner``)."""

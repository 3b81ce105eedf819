"""The thin Ray layer: extraction on Ray Train + DeepSpeed ZeRO, the descendant sweep on Ray Tune.
Only this subpackage imports Ray."""

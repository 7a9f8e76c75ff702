"""Experiments built on the library: the `steer study` reproduction and the language-steering sweep.

Everything here uses `steer`'s public modules (models, find, experts, intervention, generation,
embed, analysis, corpus); nothing in the library imports from here. `steer.cli` registers the
commands: `study.cli` (`steer study`) and `generate_cli` (`steer generate`, whose `--sweep` runs
`language_sweep`).
"""

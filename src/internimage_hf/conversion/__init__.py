"""The conversion and publishing tool behind `internimage-hf convert` / `convert-all`.

`internimage_hf.convert` holds the one key mapping and the safe readers; this subpackage adds what turns a state
dict into a publishable Hub repo: the table of official releases (`releases`), variant detection (`detect`), the
conversion pipeline with verification (`pipeline`), model cards (`card`), Hub download/upload (`hub`) and the
manifest-driven batch run (`batch`).
"""

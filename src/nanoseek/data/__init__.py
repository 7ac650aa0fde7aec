"""Data for every stage: text corpora and packing (`corpus`), the embedded synthetic corpus
(`synthetic`), verifiable reasoning tasks (`tasks`) and their rewards (`rewards`).

Submodules are imported on use, so `import nanoseek.data` stays cheap.
"""

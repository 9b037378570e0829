"""The CorrCLIPv2 memory bank: region keys in a FAISS index, CLIP region values in fp16 stores, one manifest.

A bank lives under one root folder in the authors' layout (``memory_bank/`` of their repository)::

    manifests/{bank}.manifest.txt        line i = region id i, text '{stem}#{idx}'
    manifests/{bank}.images.tsv          '{stem}\\t{start_id}\\t{num_regions}' per image, in arrival order
    masks/{bank}/{mask_model}/{stem}.npz instance masks (key 'instance_mask')
    clip_embeddings/{bank}_{store}.pt    torch.save of one fp16 [N, D] tensor, row = region id
    vfm_embeddings/{bank}_{vfm}.pt       the VFM keys, fp16 [N, Dk]
    vfm_embeddings/{bank}_{vfm}.faiss    IndexIDMap2(IndexIVFPQ) over the L2-normalised keys, ids = region ids

Not imported by ``import ovdense``; faiss (the ``bank`` extra) is imported only inside the functions that need it.
"""

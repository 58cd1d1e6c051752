"""fastacl: fast, trustworthy adversarial contrastive learning (ACL, DynACL, AIR, RCS).

    result = fastacl.train(method="acl-air", dataset="cifar10", data_dir="~/data", epochs=100)
    report = fastacl.evaluate(result.checkpoint, modes=("slf", "alf", "aff"), max_test=500)
    fastacl.export_encoder(result.checkpoint, "shipped/acl")  # encoder.safetensors + card
    encoder = fastacl.load_encoder("shipped/acl")
"""

__version__ = "0.1.0"

from fastacl import ops
from fastacl.config import TrainConfig
from fastacl.errors import FastaclError
from fastacl.evaluation import evaluate
from fastacl.export import export_encoder, load_classifier, load_encoder
from fastacl.pretrain import TrainResult, train

__all__ = ["FastaclError", "TrainConfig", "TrainResult", "__version__", "evaluate",
           "export_encoder", "load_classifier", "load_encoder", "ops", "train"]

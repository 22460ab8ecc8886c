"""moebert: BERT → Mixture-of-Experts (MoEBERT, NAACL 2022), the shared model core.

Importing it registers the MoEBERT classes with transformers' Auto classes, so
`AutoModelForSequenceClassification.from_pretrained(folder)` loads a MoEBERT checkpoint.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from moebert.configuration import ROUTE_METHODS, SPLIT_METHODS, MoEBertConfig
from moebert.modeling import (
    MoEBertForQuestionAnswering,
    MoEBertForSequenceClassification,
    MoEBertModel,
    MoEBertPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("moebert", MoEBertConfig, exist_ok=True)
AutoModel.register(MoEBertConfig, MoEBertModel, exist_ok=True)
AutoModelForSequenceClassification.register(MoEBertConfig, MoEBertForSequenceClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(MoEBertConfig, MoEBertForQuestionAnswering, exist_ok=True)

__all__ = [
    "ROUTE_METHODS",
    "SPLIT_METHODS",
    "MoEBertConfig",
    "MoEBertForQuestionAnswering",
    "MoEBertForSequenceClassification",
    "MoEBertModel",
    "MoEBertPreTrainedModel",
]

"""Model cards: the Hugging Face ``README.md`` (front matter + body) and ``card.json`` a run leaves behind."""

from __future__ import annotations

from kdpipe.model_cards.card import (
    card_to_json,
    create_card_data,
    create_eval_results,
    get_metrics_by_role,
    render_card,
    write_card,
)
from kdpipe.model_cards.facts import CardFacts, ModelResult, get_metric_key, get_metric_type

__all__ = [
    "CardFacts",
    "ModelResult",
    "card_to_json",
    "create_card_data",
    "create_eval_results",
    "get_metric_key",
    "get_metric_type",
    "get_metrics_by_role",
    "render_card",
    "write_card",
]

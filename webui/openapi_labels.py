"""The label part of the OpenAPI document: /api/labels routes and their schemas (merged by clipsearch.webui.openapi)."""

from __future__ import annotations

from typing import Any

from clipsearch.search.label_calibration import DEFAULT_CUTOFF
from clipsearch.webui.openapi_parts import Schema, array, integer, json_content, nullable, number, obj, operation, ref, responses, string

VERDICT = {"type": "string", "enum": ["confirm", "reject"]}
PROBABILITY = {"type": "number", "minimum": 0, "maximum": 1}


def _path_params(*names: str) -> list[Schema]:
    described = {"set_name": "The label set's name.", "name": "The label's name (may contain '/')."}
    return [{"name": name, "in": "path", "required": True, "description": described[name], "schema": {"type": "string"}}
            for name in names]


def _body(schema: Schema, description: str) -> Schema:
    form = {"type": "object", "properties": schema.get("properties", {})}
    return {"required": True, "description": description,
            "content": {**json_content(schema), "application/x-www-form-urlencoded": {"schema": form}}}


def label_paths() -> dict[str, Any]:
    """The /api/labels routes."""
    set_label = _path_params("set_name", "name")
    page_params = [
        {"name": "k", "in": "query", "required": False, "description": "Photos per page.",
         "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 48}},
        {"name": "offset", "in": "query", "required": False, "description": "Photos to skip (`next_offset`).",
         "schema": {"type": "integer", "minimum": 0, "default": 0}},
        {"name": "reviewed", "in": "query", "required": False, "schema": VERDICT,
         "description": "List the photos given this verdict (latest first) instead of the label's photos."},
    ]
    return {
        "/api/labels": {
            "get": operation("labels", "labels", "Every label",
                             "Every label set and label, with photo counts, precision estimates and top photos.",
                             responses(ref("LabelsOverview"), "The label sets.", 503)),
            "post": operation("saveLabel", "labels", "Create or edit a label, or install a preset",
                              "Creates the label (and its set) or edits it, then labels the library with the set. "
                              "`{\"preset\": NAME}` installs a shipped set instead.",
                              {**responses(ref("LabelSaved"), "The label was edited.", 400, 403, 503),
                               "201": {"description": "The label was created.", "content": json_content(ref("LabelSaved"))}},
                              body=_body(ref("LabelInput"), "The label, or a preset to install.")),
        },
        "/api/labels/{set_name}/{name}": {
            "get": operation("label", "labels", "One label",
                             "A label's definition, review summary and a page of its photos, most confident first.",
                             responses(ref("LabelPage"), "The label.", 400, 503), [*set_label, *page_params]),
            "patch": operation("editLabel", "labels", "Edit a label",
                               "Rename it, replace its prompts (empty: the set's templates) or set its threshold (null or "
                               "absent: the default); the library is relabelled with its set.",
                               responses(ref("LabelSaved"), "The label was changed.", 400, 403, 503), set_label,
                               body=_body(ref("LabelEdit"), "The new definition.")),
            "delete": operation("deleteLabel", "labels", "Delete a label", "Removes a label, its photos and reviews.",
                                responses(ref("Removed"), "The label was removed.", 400, 403, 503), set_label),
        },
        "/api/labels/{set_name}": {
            "delete": operation("deleteLabelSet", "labels", "Delete a label set", "Removes a set and all its labels.",
                                responses(ref("Removed"), "The set was removed.", 400, 403, 503),
                                _path_params("set_name")),
        },
        "/api/labels/{set_name}/apply": {
            "post": operation("applyLabelSet", "labels", "Label the library with a set",
                              "Recomputes which photos hold each label of the set, from the stored vectors.",
                              responses(ref("ApplyReport"), "What the apply did.", 400, 403, 409, 503),
                              _path_params("set_name")),
        },
        "/api/labels/{set_name}/{name}/reviews": {
            "post": operation("reviewLabelPhoto", "labels", "Confirm or reject a photo for a label",
                              "Confirmed photos always hold the label and refine it; rejected ones never hold it; both tune "
                              "how strong a photo must be. `clear` withdraws a verdict. The answer has the new estimate.",
                              responses(ref("ReviewAnswer"), "The review was recorded.", 400, 403, 409, 503), set_label,
                              body=_body(ref("ReviewInput"), "The photo and the verdict.")),
        },
    }


def label_schemas() -> dict[str, Schema]:
    """The schemas of the label routes."""
    prompts = nullable(array({"type": "string"}, "Prompts replacing templates x name ({} stands for the name)."))
    definition = {
        "id": integer("Label id."),
        "name": string("The label's name."),
        "prompts": prompts,
        "threshold": nullable({**PROBABILITY, "description": "Probability within the set needed (null: the default)."}),
        "effective_threshold": {**PROBABILITY, "description": "The threshold in force."},
        "photos": integer("Photos holding the label."),
        "urls": ref("LabelUrls"),
    }
    return {
        "LabelUrls": obj({"page": string("The label's web page."), "api": string("Its JSON twin."),
                          "search": string("A search restricted to the label.")}, description="Links of a label."),
        "Precision": nullable(obj({
            "precision": {**PROBABILITY, "description": "Share of reviewed photos that were right."},
            "low": {**PROBABILITY, "description": "95% Wilson interval, low end."},
            "high": {**PROBABILITY, "description": "95% Wilson interval, high end."},
            "reviewed": integer("Photos reviewed."), "confirmed": integer("Confirmed."), "rejected": integer("Rejected."),
        }, description="Precision estimated from reviews (null before any).")),
        "LabelSummary": obj({**definition, "precision": ref("Precision"), "top": array(
            obj({"id": integer("Image id."), "urls": ref("Urls")}), "The label's strongest photos.", maxItems=12)}),
        "LabelsOverview": obj({
            "sets": array(obj({"name": string("Set name."), "templates": nullable(array({"type": "string"}, "Templates.")),
                               "labels": array(ref("LabelSummary"), "Its labels.")}), "Every label set."),
            "presets": array(obj({"name": string("Preset name."), "description": string("What it holds."),
                                  "labels": integer("How many labels.")}), "Shipped presets."),
            "indexed": {"type": "boolean", "description": "Whether the library has indexed photos to label."},
        }, description="Every label set and label."),
        "LabelQuality": obj({
            "confirmed": integer("Photos confirmed."), "rejected": integer("Photos rejected."),
            "precision": ref("Precision"),
            "cutoff": nullable(number("Strength a photo needs (null before the label is applied).")),
            "default_cutoff": number(f"The cutoff without reviews ({DEFAULT_CUTOFF:g})."),
            "prototype_weight": number("How much the confirmed photos' prototype counts.", minimum=0, maximum=1),
            "applied": {"type": "boolean", "description": "Whether the label has been applied with the library's model."},
        }, description="What reviews did to a label."),
        "LabelPhoto": obj({
            "id": integer("Image id."), "path": string("File path."), "name": string("File name."),
            "probability": {**PROBABILITY, "description": "Probability of the label within its set."},
            "strength": number("How far the photo stands out for the label, in robust standard deviations."),
            "confirmed": {"type": "boolean", "description": "Held because a person confirmed it."},
            "verdict": nullable(VERDICT), "at": string("When the verdict was given (reviewed lists)."),
            "urls": ref("Urls"),
        }, optional=("probability", "strength", "confirmed", "at")),
        "LabelPage": obj({
            "set": string("Set name."), "label": obj(definition), "templates": nullable(array({"type": "string"}, "Set templates.")),
            "other_labels": array({"type": "string"}, "The set's other labels."), "quality": ref("LabelQuality"),
            "reviewed": nullable(VERDICT), "k": integer("Page size.", minimum=1), "offset": integer("Photos skipped."),
            "next_offset": nullable(integer("Offset of the next page.")), "photos": array(ref("LabelPhoto"), "This page."),
        }, description="One label and a page of its photos."),
        "ApplyReport": obj({
            "set_name": string("The set."), "images": integer("Photos scored."),
            "assigned": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                         "description": "Photos per label."},
            "unlabelled": integer("Photos with no label of the set."),
            "encoded_labels": integer("Text classifiers computed (the others came from the cache)."),
            "seconds": number("Time taken.", minimum=0), "classify_seconds": number("Of which scoring.", minimum=0),
        }, description="What labelling the library with a set did."),
        "LabelSaved": obj({
            "created": {"type": "boolean", "description": "Whether the label is new."},
            "set": string("Set name."), "label": string("Label name."),
            "applied": nullable(ref("ApplyReport")), "urls": ref("LabelUrls"), "added": {"type": "object"},
        }, optional=("created", "set", "label", "applied", "urls", "added"),
            description="A saved label (or, for a preset, `added`: labels added per set)."),
        "Removed": obj({"removed": string("What was removed.")}),
        "ReviewAnswer": obj({
            "image_id": integer("The photo."), "verdict": nullable(VERDICT),
            "holds_label": {"type": "boolean", "description": "Whether the photo holds the label now."},
            "quality": ref("LabelQuality"), "photos": integer("Photos holding the label now."),
        }, description="A recorded review and the label's new state."),
        "ImageLabel": obj({
            "set": string("Set name."), "label": string("Label name."),
            "probability": {**PROBABILITY, "description": "Probability within the set."},
            "strength": number("Strength of the label on the photo."),
            "confirmed": {"type": "boolean", "description": "Confirmed by a person."},
            "verdict": nullable(VERDICT), "urls": ref("LabelUrls"),
        }, description="A label a photo holds."),
        "LabelInput": {"type": "object", "description": "A label to create or edit, or a preset to install.",
                       "properties": {"set": {"type": "string", "maxLength": 100}, "label": {"type": "string", "maxLength": 100},
                                      "prompts": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]},
                                      "threshold": {"anyOf": [PROBABILITY, {"type": "null"}]},
                                      "templates": {"type": "array", "items": {"type": "string"}},
                                      "preset": {"type": "string"}}},
        "LabelEdit": {"type": "object", "description": "A label's new definition.",
                      "properties": {"name": {"type": "string", "maxLength": 100},
                                     "prompts": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]},
                                     "threshold": {"anyOf": [PROBABILITY, {"type": "null"}]}}},
        "ReviewInput": {"type": "object", "required": ["image_id", "verdict"], "description": "A verdict on a photo.",
                        "properties": {"image_id": {"type": "integer", "minimum": 0},
                                       "verdict": {"type": "string", "enum": ["confirm", "reject", "clear"]}}},
    }

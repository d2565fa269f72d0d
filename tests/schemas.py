"""Marshmallow schemas the per-key validation tests configure by name."""

from marshmallow import Schema
from marshmallow import fields


class PipelineSchema(Schema):
    name = fields.String(required=True)
    workers = fields.Integer(required=True)

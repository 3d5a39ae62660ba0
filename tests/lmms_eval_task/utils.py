"""Images and prompts of the visattn_tiny task: each row of questions.jsonl names its image's size and
two colours (left and right halves), drawn here so no image file is stored."""

from PIL import Image


def doc_to_visual(doc):
    width, height = doc["size"]
    image = Image.new("RGB", (width, height), tuple(doc["left"]))
    image.paste(tuple(doc["right"]), (width // 2, 0, width, height))
    return [image]


def doc_to_text(doc):
    return doc["question"]

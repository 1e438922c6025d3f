"""Judges for real images, for tools.eval.evaluate's --judge: CLIP scores and an open-vocabulary detector, both models
that transformers implements, loaded with from_pretrained from a Hugging Face Hub name or a local folder.

    --judge tools.eval.real_judges:OwlDetector,tools.eval.real_judges:ClipScore
        [--detector-model google/owlv2-base-patch16-ensemble] [--detector-threshold 0.1] [--detector-query phrase]
        [--clip-model openai/clip-vit-base-patch16] [--clip-template "a photo of a {}"]

ClipScore (a scorer) gives the two CLIP numbers that Attend-and-Excite (Chefer et al. 2023) and Attention Regulation
(Zhang et al. 2024) report: `clip_prompt`, the cosine similarity of the image and the whole prompt in CLIP's joint
space, and `clip_min_object`, the smallest similarity of the image with "a photo of a <object>" over the prompt's
objects (the neglected object pulls it down). ViT-B/16 by default, as in Attend-and-Excite.

OwlDetector (a judge) says for each named object whether the image shows it: OWLv2 (Minderer et al. 2023).
Why OWLv2 rather than Grounding DINO: OWLv2 scores every text query on its own, one number per (box, query), so
"is there a <object>?" is one score against one threshold per object. Grounding DINO reads all objects as one
caption and scores its tokens: a phrase's score depends on its neighbours in the caption and on mapping tokens back
to phrases, with two thresholds (box and text). OWLv2 also reads text with CLIP's tokenizer and vocabulary, the one
minisd ships. As in transformers' post_process_object_detection, each box is given the query it matches best
(queries compete, so one blob that is half cat, half dog counts once) and its sigmoid score; an object is present
when a box given its query scores at least --detector-threshold (0.1, transformers' example value for OWLv2).
"""
import torch

from regulation.targets import auto_targets

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
DEFAULT_TEMPLATE = "a photo of a {}"


def object_text(obj, words="phrase"):
    """("red", "car") or "red car" -> "red car" ("phrase") or "car" ("noun")."""
    text = obj if isinstance(obj, str) else " ".join(obj)
    return text.split()[-1] if words == "noun" else text


def objects_for(prompt):
    """The objects of a prompt given without them (a text file of prompts): the nouns regulation.targets picks."""
    return [w.split("#")[0] for w in auto_targets(prompt)] or None


def check_template(template, flag):
    if template.count("{}") != 1:
        raise ValueError(f"{flag} must hold one {{}} where the object goes, got {template!r}")
    return template


def load(model_cls, name, device):
    """(model, processor) from a Hub name or a folder saved with save_pretrained; one-line error otherwise."""
    from transformers import AutoProcessor
    try:
        model = model_cls.from_pretrained(name)
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load {model_cls.__name__} from {name!r} (a Hugging Face Hub name, or a folder "
                         f"written by save_pretrained with its processor): {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), processor


class ClipScore:
    """scores(image, prompt, objects) -> {"clip_prompt": ..., "clip_min_object": ...} (no objects: the first only)."""

    def __init__(self, model=DEFAULT_CLIP, template=DEFAULT_TEMPLATE, device="cpu"):
        from transformers import CLIPModel
        self.template = check_template(template, "--clip-template")
        self.model, self.processor = load(CLIPModel, model, device)
        self.device = device
        self.settings = f"model={model} template={template!r}"

    @staticmethod
    def add_arguments(ap):
        ap.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP for ClipScore: Hub name or local folder")
        ap.add_argument("--clip-template", default=DEFAULT_TEMPLATE, help="text of one object for clip_min_object")

    @classmethod
    def from_args(cls, args):
        return cls(args.clip_model, args.clip_template, args.device)

    @torch.no_grad()
    def similarities(self, image, texts):
        """(len(texts),) cosine similarities of the image with each text in CLIP's joint space."""
        inputs = self.processor(text=texts, images=image, return_tensors="pt", padding=True, truncation=True)
        out = self.model(**inputs.to(self.device))
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return (img @ txt.T)[0].float().cpu()

    def scores(self, image, prompt, objects):
        texts = [prompt] + [self.template.format(object_text(o)) for o in objects or []]
        sims = self.similarities(image, texts)
        out = {"clip_prompt": float(sims[0])}
        if objects:
            out["clip_min_object"] = float(sims[1:].min())
        return out

    objects_for = staticmethod(objects_for)


class OwlDetector:
    """judge(image, objects) -> [bool]: does a box of the image match each object's query (see the module doc)?"""

    def __init__(self, model=DEFAULT_DETECTOR, threshold=0.1, template=DEFAULT_TEMPLATE, query="phrase",
                 device="cpu"):
        from transformers import Owlv2ForObjectDetection
        if not 0 <= threshold <= 1:
            raise ValueError(f"--detector-threshold is a probability, got {threshold}")
        if query not in ("phrase", "noun"):
            raise ValueError(f"--detector-query must be phrase or noun, got {query!r}")
        self.threshold, self.query = float(threshold), query
        self.template = check_template(template, "--detector-template")
        self.model, self.processor = load(Owlv2ForObjectDetection, model, device)
        self.device = device
        self.settings = f"model={model} threshold={threshold} template={template!r} query={query}"

    @staticmethod
    def add_arguments(ap):
        ap.add_argument("--detector-model", default=DEFAULT_DETECTOR, help="OWLv2 for OwlDetector: Hub name or folder")
        ap.add_argument("--detector-threshold", type=float, default=0.1, help="score a box needs to count")
        ap.add_argument("--detector-template", default=DEFAULT_TEMPLATE, help="query text of one object")
        ap.add_argument("--detector-query", default="phrase", choices=("phrase", "noun"),
                        help="query the object with its attribute ('red car': what binding needs) or its noun only")

    @classmethod
    def from_args(cls, args):
        return cls(args.detector_model, args.detector_threshold, args.detector_template, args.detector_query,
                   args.device)

    def queries(self, objects):
        """The distinct query texts and, per object, the index of its query."""
        texts = [self.template.format(object_text(o, self.query)) for o in objects]
        unique = list(dict.fromkeys(texts))
        return unique, [unique.index(t) for t in texts]

    @torch.no_grad()
    def presence_scores(self, image, objects):
        """Per object: the best score of a box whose best-matching query is the object's (0 when no box is)."""
        texts, index = self.queries(objects)
        inputs = self.processor(text=[texts], images=image, return_tensors="pt")
        logits = self.model(**inputs.to(self.device)).logits[0].float()     # (boxes, queries)
        best, label = torch.sigmoid(logits).max(-1)                          # each box: its query and score
        per_query = [float(best[label == q].max()) if (label == q).any() else 0.0 for q in range(len(texts))]
        return [per_query[i] for i in index]

    def __call__(self, image, objects):
        return [s >= self.threshold for s in self.presence_scores(image, list(objects))]

    objects_for = staticmethod(objects_for)

"""The table of methods: one entry per method, written by the method's own module, read by everything else.

Each method's module ends by registering what it takes:

    METHOD = register(Method("regulate", "Attention Regulation", Knob("edit_steps", "edit steps", 25),
                             takes={"targets", "layers", "edit_steps"}, set_up=set_up, make_editor=make_editor))

regulation/editors.py imports every method's module, so read the table through it (`regulation.editors.METHODS`:
names in the paper's order -> Method); its `set_up` runs an entry on a UNet or on joint attention alike. The command
line (choices, help, refusals), the page (choices, titles) and the benchmark (methods, titles, knobs) read it.
"""
from contextlib import nullcontext
from dataclasses import dataclass, field

# set_up's options that a method may take; each but `config` is a command-line flag (`layers` is --regulate-layers,
# `weights` --concept-weights, the others their own name). `config` is the method's own config dataclass, for code
# that changes what the command line does not expose (tools, forks).
OPTIONS = ("targets", "layers", "edit_steps", "layout", "strength", "layout_background", "phrase_swap", "weights",
           "config")


def flag(option):
    """The command-line flag of a set_up option."""
    return "--" + {"layers": "regulate-layers", "weights": "concept-weights"}.get(option, option).replace("_", "-")


@dataclass(frozen=True)
class Knob:
    """A method's one strength knob: the one its authors' README or demo tells users to turn. `option` is the
    set_up argument (and command-line flag) that sets it; `name` what is recorded beside an image; `default` its
    authors' value (None: the guidance scale); `help` what --strength's help calls it; `minimum` the least value
    (None: any finite number); `recorded`: whether set_up records it beside the image (False where the method
    records the values it uses instead)."""
    option: str
    name: str
    default: float | None
    help: str = ""
    minimum: float | None = 0.0
    recorded: bool = True


@dataclass(frozen=True)
class Method:
    """What a method takes, declared once.

    name: its --method value; title: its paper's name; about: what --method's help says of it (default: title).
    knob: its strength knob. takes: the set_up options it accepts; anything else given to it is refused by name.
    set_up(pipe, prompt, steps, **options, **run) -> Run: its hooks and pipeline options for one image, on a
    UNet or on joint attention (regulation.joint_regulation.is_joint(pipe.cfg) says which); `run` holds seed,
    guidance, height, width, sampler, spacing and log, for the set-ups that need them.
    not_joint: why it does not run on joint attention (SD 3's MMDiT); None: it does. joint_takes: the options it
    takes there (None: those of `takes`).
    target_words: --targets names words that the caller resolves to token positions (regulation.editors.
    pick_targets) before set_up; False: the method reads --targets itself (its own syntax).
    needs: options it cannot run without (refused before the model is read). maps_absent: why it has no attention
    maps to show (None: it acts on the maps of the layers its Run selects). self_attention: it edits
    self-attention, which a compiled UNet keeps inside its graph. texts(prompt): the conditional texts per image
    (None: one). make_editor(pipe, prompt, targets, steps, seed, layers, edit_steps, config): its hook alone, for
    Python callers that give a config (None: set_up only)."""
    name: str
    title: str
    knob: Knob
    takes: frozenset
    set_up: object
    about: str = None
    not_joint: str = None
    joint_takes: frozenset = None
    target_words: bool = True
    needs: tuple = ()
    maps_absent: str = None
    self_attention: bool = False
    texts: object = None
    make_editor: object = None

    @property
    def takes_words(self):
        """Whether it takes target words, which the caller resolves (regulation.editors.pick_targets)."""
        return "targets" in self.takes and self.target_words

    def __post_init__(self):
        object.__setattr__(self, "takes", frozenset(self.takes))
        if self.joint_takes is not None:
            object.__setattr__(self, "joint_takes", frozenset(self.joint_takes))
        for options in (self.takes, self.joint_takes or ()):
            unknown = set(options) - set(OPTIONS)
            if unknown:
                raise ValueError(f"method {self.name!r} takes options set_up does not know: {sorted(unknown)}; "
                                 f"they are {', '.join(OPTIONS)}")
        if self.knob.option not in self.takes:
            raise ValueError(f"method {self.name!r}: its knob {self.knob.option!r} is not among the options it takes")


METHODS = {}   # name -> Method, in the order the modules registered them


def register(method):
    """Adds `method` to the table; a name taken already is an error (a module imported twice under two names)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


@dataclass
class Run:
    """What a method adds to one pipeline call: `hooks` to pass, `options` (keyword arguments of the call), a
    `context` to make the call in; `select`, the layers whose maps it acts on, and `shown`, the words whose
    maps it acts on (None for a method that acts on no attention map); `settings`, what to record beside the
    image; `method`, its name (filled by regulation.editors.set_up)."""
    method: str = None
    hooks: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    context: object = field(default_factory=nullcontext)
    select: object = None
    shown: list = None
    settings: dict = field(default_factory=dict)


def editor_run(hook, targets, joint):
    """The Run of one editor of target words (Attention Regulation, Attend-and-Excite): the words, the layers
    (joint attention: its blocks by name; a UNet: the specs as given) and the edit steps recorded."""
    layers = hook.select.names if joint else hook.select.specs
    return Run(hooks=[hook], select=hook.select, shown=list(targets),
               settings={"Regulation targets": " ".join(t.word for t in targets), "Regulation layers": " ".join(layers),
                         "Regulation edit steps": hook.edit_steps})

"""`python -m ke_tf.convert`: a reference implementation's checkpoint -> ke_tf params file."""

from ke_tf.cli import guarded, parser_for

DESCRIPTION = """Convert a checkpoint of a reference implementation into a ke_tf params file.

    python -m ke_tf.convert --from ke_pytorch epoch_199.state --arch resnet18 --out ke.pkl
    python -m ke_tf.convert --from reducenet_pytorch teacher.pth --arch reduce20 --out t.pkl
    python -m ke_tf.convert --from ekg_tf2 slimmed_params.pkl --arch resnet56 --out ekg.pkl
    python test.py --trained_param ke.pkl --dataset oxford_flowers102

Sources load without running code from them (torch weights_only=True; restricted unpickler).
"""


@guarded
def main(argv):
    from ke_tf.convert import FORMATS, convert_checkpoint

    parser = parser_for(DESCRIPTION)
    parser.add_argument("--from", dest="fmt", required=True, choices=sorted(FORMATS), help="source format")
    parser.add_argument("src", help="source checkpoint (.pth/.state/.pkl, or .npz of the same keys)")
    parser.add_argument("--arch", required=True, help="ke_tf architecture, e.g. resnet18, reduce20, resnet56")
    parser.add_argument("--out", required=True, help="params file to write")
    parser.add_argument("--image_size", type=int, help="input size recorded in the model spec")
    parser.add_argument("--dataset", help="dataset name recorded for test.py (else pass --dataset there)")
    parser.add_argument(
        "--split_rate",
        type=float,
        help="ke_pytorch: KE split rate recorded for further training (default: from the fc mask)",
    )
    parser.add_argument(
        "--variant", choices=("teacher", "student"), help="reducenet_pytorch: default from the checkpoint's scaler"
    )
    args = parser.parse_args(argv)
    options = {
        "ke_pytorch": {"split_rate": args.split_rate},
        "reducenet_pytorch": {"variant": args.variant},
        "ekg_tf2": {},
    }[args.fmt]
    if args.image_size:
        options["image_size"] = args.image_size
    model, arrays, meta = convert_checkpoint(args.fmt, args.src, args.arch, args.out, args.dataset, **options)
    print(
        f"wrote {args.out}: {meta['model']['arch']} ({meta['model']['options']}), "
        f"{len(arrays)} variables, {model.count_params()} parameters"
    )
    return args.out


if __name__ == "__main__":
    main()

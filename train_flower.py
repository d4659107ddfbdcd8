"""Train on Flower102 (tfds or KE's image-folder layout) with any ke_tf method: `ke-tf-train`
with Knowledge Evolution of ResNet-18 on Flower102 as the default config.

    python train_flower.py --set data.data_dir=/data/tfds
    python train_flower.py --config digits_resnet20_ke
"""

from ke_tf.cli import train_main

main = train_main("flower102_resnet18_ke", __doc__)

if __name__ == "__main__":
    main()

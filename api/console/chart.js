// The loss chart: uPlot (vendored, MIT; vendor/uPlot-LICENSE) with train loss and, where a step
// evaluated, validation loss against step. Points arrive one metrics event at a time; the redraw is
// batched to one per animation frame, and the chart follows its box's width (phones included).

const COLORS = { train: "#2563eb", valid: "#dc2626" };

export class LossChart {
  constructor(box) {
    this.box = box;
    this.steps = [];
    this.train = [];
    this.valid = [];
    this.index = new Map(); // step -> position (a resumed run may send a step again: keep one point)
    this.frame = null;
    this.plot = new uPlot({
      width: this.width(),
      height: 280,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: "loss" }],
      series: [
        { label: "step" },
        { label: "train loss", stroke: COLORS.train, width: 2, spanGaps: true },
        { label: "validation loss", stroke: COLORS.valid, width: 2, spanGaps: true,
          points: { show: true, size: 6 } },
      ],
    }, [[], [], []], box);
    this.resize = () => this.plot.setSize({ width: this.width(), height: 280 });
    window.addEventListener("resize", this.resize);
  }

  width() {
    return Math.max(240, Math.floor(this.box.clientWidth || this.box.parentElement.clientWidth || 600));
  }

  get length() {
    return this.steps.length;
  }

  lastTrain() {
    const v = this.train[this.train.length - 1];
    return typeof v === "number" ? v.toFixed(4) : "—";
  }

  /** One metrics event's `data`: {step, train_loss, valid_loss?, ...}. */
  add(data) {
    const step = Number(data.step);
    const train = typeof data.train_loss === "number" ? data.train_loss : null;
    const valid = typeof data.valid_loss === "number" ? data.valid_loss : null;
    let i = this.index.get(step);
    if (i === undefined) {
      i = this.steps.length;
      if (i > 0 && step < this.steps[i - 1]) { // out of order: insert in place
        i = this.steps.findIndex((s) => s > step);
        this.steps.splice(i, 0, step);
        this.train.splice(i, 0, train);
        this.valid.splice(i, 0, valid);
        this.steps.forEach((s, j) => this.index.set(s, j));
      } else {
        this.steps.push(step);
        this.train.push(train);
        this.valid.push(valid);
        this.index.set(step, i);
      }
    } else {
      this.train[i] = train;
      this.valid[i] = valid;
    }
    if (this.frame === null) {
      this.frame = requestAnimationFrame(() => {
        this.frame = null;
        this.plot.setData([this.steps, this.train, this.valid]);
      });
    }
  }

  destroy() {
    window.removeEventListener("resize", this.resize);
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.plot.destroy();
  }
}

"""The synthetic reports of phantom.py: CT-RATE-style findings and impressions written from labels.

One finding per positive sentence, worded with the class name or a common synonym so that the
rule-based summarizer (prepare/summarize_rules.py) can keep and normalise it; a random subset of negations and
normal statements; section order as in a CT-RATE report. No template starts "There is" (the
zero-shot prompt of eval.py).

    python -c "import prepare.phantom_reports"   # a library; prepare/phantom.py is the command line
"""
import numpy as np

from prepare.phantom_scene import (ARTERIAL, ATELECTASIS, BRONCHIECTASIS, CARDIOMEGALY, CLASSES,
                                   CONSOLIDATION, CORONARY, EMPHYSEMA, FIBROSIS, HERNIA, LYMPH,
                                   MATERIAL, MOSAIC, NODULE, OPACITY, PERIBRONCHIAL, PERICARDIAL,
                                   PLEURAL, SEPTAL)

WORDS = dict(
    deg=["mild", "minimal", "moderate", "marked", "slight"],
    lobe=["the right lower lobe", "the left lower lobe", "the right upper lobe", "the left upper lobe",
          "the right middle lobe", "the lingula", "both lower lobes", "the basal segments of both lower lobes"],
    lungs=["both lungs", "the right lung", "the left lung", "bilateral lower lobes", "both upper lobes"],
    side=["right", "left", "bilateral"],
    dev=["cardiac pacemaker", "port catheter", "central venous catheter", "sternotomy wires"],
    station=["right paratracheal", "subcarinal", "prevascular", "bilateral hilar", "left axillary", "left paratracheal"])

POSITIVE = {
    MATERIAL: ["Medical material consistent with a {dev} is observed.", "A {dev} is seen (medical material).",
               "Metallic medical material belonging to a {dev} is noted."],
    ARTERIAL: ["Atherosclerotic calcifications are observed in the wall of the thoracic aorta.",
               "Calcific atheromatous plaques are seen in the aortic wall.",
               "Arterial wall calcification is noted along the aortic arch and descending aorta.",
               "{Deg} calcified plaques are present in the aortic wall."],
    CARDIOMEGALY: ["Cardiomegaly is observed.", "The heart is enlarged.", "Heart size is increased (cardiomegaly).",
                   "An enlarged heart is noted.", "{Deg} cardiomegaly is present."],
    PERICARDIAL: ["Pericardial effusion measuring {mm} mm in its thickest part is observed.",
                  "{Deg} pericardial effusion is noted.", "Fluid is seen in the pericardial space (pericardial effusion)."],
    CORONARY: ["Calcific plaques are observed in the coronary arteries.", "Coronary artery wall calcification is noted.",
               "Calcifications are seen along the left anterior descending coronary artery."],
    HERNIA: ["A {deg} hiatal hernia is observed at the lower end of the esophagus.", "A sliding type hiatal hernia is seen.",
             "A hiatus hernia containing air and fluid is noted behind the heart."],
    LYMPH: ["Enlarged lymph nodes up to {mm} mm are observed in the {station} region.",
            "Lymphadenopathy is noted in the {station} station.", "Pathologically enlarged {station} lymph nodes are seen."],
    EMPHYSEMA: ["Emphysematous changes are observed in {lungs}.", "Centrilobular emphysema is seen, predominantly in the upper lobes.",
                "{Deg} emphysema is present in {lungs}."],
    ATELECTASIS: ["Subsegmental atelectasis is observed in {lobe}.", "Linear atelectasis is seen in {lobe}.",
                  "Plate-like atelectatic bands are noted in {lobe}."],
    NODULE: ["A {mm} mm nodule is observed in {lobe}.", "Solid pulmonary nodules up to {mm} mm are seen in {lungs}.",
             "A lung nodule measuring {mm} mm is noted in {lobe}."],
    OPACITY: ["Ground-glass opacities are observed in {lobe}.", "Patchy ground glass densities are seen in {lungs}.",
              "Lung opacity with a ground-glass appearance is noted in {lobe}."],
    FIBROSIS: ["Fibrotic sequelae changes are observed in {lobe}.", "Linear fibrotic bands are seen subpleurally in {lobe}.",
               "Pulmonary fibrotic sequela is noted in {lobe}."],
    PLEURAL: ["{Side} pleural effusion measuring {mm} mm in its thickest part is observed.",
              "Pleural fluid is seen on the {side} side.", "{Deg} {side} pleural effusion is present."],
    MOSAIC: ["A mosaic attenuation pattern is observed in {lungs}.", "Mosaic attenuation is seen in {lobe}.",
             "A mosaic perfusion pattern is noted in {lungs}."],
    PERIBRONCHIAL: ["Peribronchial thickening is observed in {lungs}.",
                    "Bronchial wall thickening with peribronchial cuffing is seen in {lobe}.",
                    "{Deg} peribronchial thickening is noted."],
    CONSOLIDATION: ["Consolidation with air bronchograms is observed in {lobe}.", "Air-space consolidation is seen in {lobe}.",
                    "Patchy consolidation areas are noted in {lobe}."],
    BRONCHIECTASIS: ["Bronchiectasis is observed in {lobe}.", "Cylindrical bronchiectatic changes are seen in {lungs}.",
                     "Dilated bronchi consistent with bronchiectasis are noted in {lobe}."],
    SEPTAL: ["Interlobular septal thickening is observed in {lungs}.", "Smooth septal thickenings are seen at the lung periphery.",
             "Thickened interlobular septa are noted in {lobe}."],
}
NEGATIVE = {
    CARDIOMEGALY: ["Heart contour and size are normal.", "Heart size is within normal limits."],
    PERICARDIAL: ["Pericardial effusion-thickening was not observed.", "No pericardial effusion was detected."],
    LYMPH: ["No enlarged lymph nodes were detected in mediastinal or hilar regions.", "No lymphadenopathy was seen."],
    HERNIA: ["No hiatal hernia was observed."],
    PLEURAL: ["No pleural effusion was detected.", "Pleural effusion-thickening was not detected."],
    EMPHYSEMA: ["No emphysematous change was seen."],
    CONSOLIDATION: ["No consolidation was observed."],
    NODULE: ["No mass or nodule was detected in the lung parenchyma."],
}
NORMAL = ["Trachea and both main bronchi are open.", "Mediastinal structures were evaluated as normal.",
          "Thoracic esophageal calibration was normal.", "Upper abdominal organs included in the sections are normal.",
          "Bone structures in the study area are natural.", "Vertebral corpus heights are preserved."]
IMPRESSION = {MATERIAL: "Medical material.", ARTERIAL: "Aortic atherosclerotic calcification.", CARDIOMEGALY: "Cardiomegaly.",
              PERICARDIAL: "Pericardial effusion.", CORONARY: "Coronary artery calcification.", HERNIA: "Hiatal hernia.",
              LYMPH: "Lymphadenopathy.", EMPHYSEMA: "Emphysema.", ATELECTASIS: "Atelectasis.", NODULE: "Lung nodule.",
              OPACITY: "Ground-glass opacity.", FIBROSIS: "Fibrotic sequelae.", PLEURAL: "Pleural effusion.",
              MOSAIC: "Mosaic attenuation pattern.", PERIBRONCHIAL: "Peribronchial thickening.", CONSOLIDATION: "Consolidation.",
              BRONCHIECTASIS: "Bronchiectasis.", SEPTAL: "Interlobular septal thickening."}
SECTIONS = [[MATERIAL], [CARDIOMEGALY, PERICARDIAL, ARTERIAL, CORONARY, LYMPH, HERNIA],
            [EMPHYSEMA, MOSAIC, NODULE, OPACITY, CONSOLIDATION, ATELECTASIS, FIBROSIS, SEPTAL, PERIBRONCHIAL,
             BRONCHIECTASIS], [PLEURAL]]
CLINICAL = ["Cough.", "Shortness of breath.", "Fever and cough.", "Chest pain.", "Control examination.", "Not given."]
TECHNIQUE = ["Axial images of the thorax were obtained without contrast.",
             "Contrast-enhanced axial images from the thoracic inlet to the upper abdomen."]


def _fill(template, rng):
    pick = {k: str(v[rng.integers(len(v))]) for k, v in WORDS.items()}
    pick.update(mm=str(int(rng.integers(8, 40))), Deg=pick["deg"].capitalize(), Side=pick["side"].capitalize())
    return template.format(**pick)


def compose_report(labels, rng):
    """Findings and impressions for an 18-label vector: positives in varied wording, a random subset of
    negations and normal statements, in the section order of a CT-RATE report."""
    labels = np.asarray(labels).astype(bool)
    out = []
    for s, section in enumerate(SECTIONS):
        if s == 2:
            out.append(rng.choice(["When examined in the lung parenchyma window;", "In the lung window:", ""]))
        if s == 1:
            out.append(NORMAL[0] if rng.random() < 0.8 else "")
        for k in section:
            if labels[k]:
                out.append(_fill(POSITIVE[k][rng.integers(len(POSITIVE[k]))], rng))
            elif k in NEGATIVE and rng.random() < 0.7:
                out.append(NEGATIVE[k][rng.integers(len(NEGATIVE[k]))])
    mediastinum_clear = not labels[[LYMPH, HERNIA, PERICARDIAL, CARDIOMEGALY]].any()
    out += [sent for i, sent in enumerate(NORMAL[1:]) if rng.random() < 0.5 and (i > 0 or mediastinum_clear)]
    findings = " ".join(sent for sent in out if sent)
    pos = [IMPRESSION[k] for k in range(len(CLASSES)) if labels[k]]
    impressions = " ".join(pos) if pos else "Thoracic CT examination within normal limits."
    return dict(ClinicalInformation_EN=str(rng.choice(CLINICAL)), Technique_EN=str(rng.choice(TECHNIQUE)),
                Findings_EN=findings, Impressions_EN=impressions)
